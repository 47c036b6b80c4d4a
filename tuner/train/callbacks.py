"""Where the run stands in its data, saved with every checkpoint: one callback for a stream, a mix of sources
in memory and a streamed mix.

Rows used: an optimizer step takes per_device_train_batch_size x gradient_accumulation_steps x world_size
rows (accelerate dispatches one stream's rows to every process, or shards the in-memory rows' indices), so
after step s the run has used s times that (the last step of a mix that ends under --mix_exhausted stop may
take fewer). Rows the dataloader has read ahead are not counted.

Resume. In memory a mix is a map-style dataset read in order, and Trainer's own resume skips the rows earlier
steps used by index: nothing to save. A stream (data.stream.ResumableStream) or a streamed mix
(data.mix_stream.StreamMix) has no length, and Trainer would re-read everything before the resume point; so
`DataPosition` writes the data's own state after the rows used into trainer_state.json, and a resumed run
loads it before its first row is read (the run sets ignore_data_skip=True), so every source continues with
the row an uninterrupted run would have read next. A mix also reports the trained tokens each source gave
(run_summary.json's `tokens_per_source`).
"""

from __future__ import annotations

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from tuner.common import rows_per_step
from tuner.errors import UsageError


class DataPosition(TrainerCallback, ExportableState):
    def __init__(self):
        self.data = None  # a stream, a StreamMix or a MixedRows, found under the dataloader's wrappers
        self.consumed = 0  # rows used by optimizer steps, in the whole run
        self.start_step = self.start_rows = self.per_step = 0

    @property
    def streamed(self) -> bool:
        return hasattr(self.data, "load_state")

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.data = find_data(train_dataloader)
        self.per_step = rows_per_step(args)
        self.start_step, self.start_rows = state.global_step, state.global_step * self.per_step
        if self.streamed:
            if args.dataloader_num_workers:
                raise RuntimeError("A stream tracks its position in the main process: use dataloader_num_workers=0.")
            if state.global_step:
                self.resume(args, state)
            self.start_rows = self.data.rows_read
        self.consumed = self.start_rows

    def resume(self, args, state) -> None:
        if not args.ignore_data_skip:
            raise RuntimeError("A stream restores its position itself: set ignore_data_skip=True.")
        saved = (state.stateful_callbacks.get(type(self).__name__) or {}).get("attributes", {}).get("position")
        if saved is None:
            raise UsageError(self.data.resume_problem)
        self.data.load_state(saved)

    def on_step_end(self, args, state, control, **kwargs):
        self.consumed = self.start_rows + (state.global_step - self.start_step) * self.per_step
        if self.streamed:
            self.consumed = min(self.consumed, self.data.rows_read)  # a mix that stops ended inside this step
            self.data.forget_before(self.consumed)
        else:
            self.consumed = min(self.consumed, len(self.data))

    def state(self) -> dict:
        position = self.data.state_at(self.consumed) if self.data is not None and self.streamed else None
        return {"args": {}, "attributes": {"position": position}}

    def tokens_per_source(self) -> dict[str, int] | None:
        return self.data.tokens_per_source(self.consumed) if hasattr(self.data, "tokens_per_source") else None


def find_data(dataloader):
    """The training data under accelerate's and influence's wrappers (DataLoaderShard, IndexedDataset, ...)."""
    node = dataloader
    for _ in range(5):
        node = getattr(node, "dataset", None)
        if hasattr(node, "load_state") or hasattr(node, "tokens_per_source"):
            return node
    raise RuntimeError("DataPosition needs a stream or a mix of sources as the training dataset.")


def tokens_per_source(trainer) -> dict[str, int] | None:
    """Trained tokens each source gave the optimizer steps of the run (run_summary.json), or None without a mix."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(callback, DataPosition):
            return callback.tokens_per_source()
    return None
