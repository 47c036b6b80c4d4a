"""The Trainer's side of a mix of sources (mix_data.py): how far the run has read it, the trained tokens each
source gave (run_summary.json's `tokens_per_source`), and, streamed, the mix's position in each checkpoint.

Rows used: an optimizer step takes per_device_train_batch_size x gradient_accumulation_steps x world_size
rows of the mix (accelerate dispatches one stream's rows to every process, or shards the in-memory rows'
indices), so after step s the run has used s times that (the last step of a mix that ends under
--mix_exhausted stop may take fewer). Rows the dataloader has read ahead are not counted.

Resume. In memory the mix is a map-style dataset read in order, and Trainer's own resume skips the rows
earlier steps used by index: nothing to save. Streamed, `MixPosition` writes the mix's state after the
rows used (mix_data.StreamMix.state_at) into trainer_state.json; a resumed run loads it before its first
row is read (the run sets ignore_data_skip=True, as --streaming does), so every source continues with
the row an uninterrupted run would have read next.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .errors import UsageError

logger = logging.getLogger(__name__)


class MixPosition(TrainerCallback, ExportableState):
    def __init__(self):
        self.mix = None  # mix_data.MixedRows or mix_data.StreamMix, found in the dataloader
        self.consumed = 0  # rows used by optimizer steps, in the whole run
        self.start_step = self.start_rows = self.rows_per_step = 0

    @property
    def streamed(self) -> bool:
        return hasattr(self.mix, "load_state")

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        self.mix = find_mix(train_dataloader)
        self.rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        self.start_step, self.start_rows = state.global_step, state.global_step * self.rows_per_step
        if self.streamed:
            if args.dataloader_num_workers:
                raise RuntimeError("A streamed mix tracks its position in the main process: use dataloader_num_workers=0.")
            if state.global_step:
                self.resume(args, state)
            self.start_rows = self.mix.examples
        self.consumed = self.start_rows

    def resume(self, args, state) -> None:
        if not args.ignore_data_skip:
            raise RuntimeError("A streamed mix restores its position itself: set ignore_data_skip=True.")
        saved = (state.stateful_callbacks.get(type(self).__name__) or {}).get("attributes", {}).get("mix")
        if saved is None:
            raise UsageError(
                "--streaming with several sources: the checkpoint has no position of the mix (it was written by another "
                "kind of run). Resume it with the options it was written with, or start in a new --output_dir."
            )
        self.mix.load_state(saved)
        logger.info("Resuming the mix after %d rows: %s", saved["mixture"]["examples"],
                    ", ".join(f"{s['name']} pass {s['pass']} row {s['position']}" for s in saved["mixture"]["sources"]))  # fmt: skip

    def on_step_end(self, args, state, control, **kwargs):
        self.consumed = self.start_rows + (state.global_step - self.start_step) * self.rows_per_step
        if self.streamed:
            self.consumed = min(self.consumed, self.mix.examples)  # the mix ended (stop) inside this step
            self.mix.forget_before(self.consumed)
        else:
            self.consumed = min(self.consumed, len(self.mix))

    def state(self) -> dict:
        mix = self.mix.state_at(self.consumed) if self.mix is not None and self.streamed else None
        return {"args": {}, "attributes": {"mix": mix}}

    def tokens_per_source(self) -> dict[str, int] | None:
        return self.mix.tokens_per_source(self.consumed) if self.mix is not None else None


def find_mix(dataloader):
    """The mix under accelerate's and influence's wrappers (DataLoaderShard, IndexedDataset, ...)."""
    node = dataloader
    for _ in range(5):
        node = getattr(node, "dataset", None)
        if hasattr(node, "tokens_per_source"):
            return node
    raise RuntimeError("MixPosition needs a mix_data.MixedRows or StreamMix as the training dataset.")


def tokens_per_source(trainer) -> dict[str, int] | None:
    """Trained tokens each source gave the optimizer steps of the run (run_summary.json), or None without a mix."""
    for callback in getattr(getattr(trainer, "callback_handler", None), "callbacks", []):
        if isinstance(callback, MixPosition):
            return callback.tokens_per_source()
    return None
