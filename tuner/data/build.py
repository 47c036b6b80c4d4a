"""The data layer's entry point. Every run is a list of sources (specs.py): one --train_file or --dataset_name
is a list of one, --datasets or several --train_file a longer list. Each source is opened (sources.py) and
built once, here, as a run of its own would build it; several are then mixed (mix.py) from the built parts.

    choose_format             --data_format, or auto from the columns (logged with the reason)
    text, in memory           text.py: documents -> grouping.py chunks -> token cache
    text, streamed            stream.build_text_stream
    chat/instruction data     sft.build_in_memory, or sft_stream.build_sft_stream
"""

from __future__ import annotations

import logging
from functools import partial

from tuner.data import formats, mix, sft, sft_stream, sources, specs, stream, text
from tuner.data.datasets import Datasets
from tuner.data.formats import Columns, FormatChoice
from tuner.data.mix import PACKED, PADDED, TEXT, Part
from tuner.data.sources import Opened
from tuner.data.specs import SourceSpec, SourceView
from tuner.errors import UsageError

logger = logging.getLogger(__name__)


def build_datasets(cfg, tokenizer) -> Datasets:
    """Training and evaluation data of any format, in memory or streamed; reads rows only as needed."""
    parts = [build_part(cfg, tokenizer, spec) for spec in specs.specs_from_options(cfg)]
    if len(parts) > 1:
        return mix.mix_parts(cfg, parts)
    one, spec = parts[0].datasets, parts[0].spec
    if spec.named and one.describer:  # a `datasets` list of one: that source, named as the user named it
        one.describer = partial(one.describer, source=spec.name)
    return one


def build_part(cfg, tokenizer, spec: SourceSpec) -> Part:
    """One source, opened and built with its own format and columns over the run's options."""
    opened = open_one(spec, cfg)
    built = build_source(SourceView(cfg, spec), tokenizer, opened)
    kind = TEXT if built.format == "text" else PACKED if built.packed else PADDED
    return Part(spec, built, kind)


def open_one(spec: SourceSpec, cfg, streaming: bool | None = None) -> Opened:
    streaming = cfg.streaming if streaming is None else streaming
    return sources.open_spec(spec, streaming, cfg.validation_split_percentage, cfg.seed)


def open_run_source(cfg, streaming: bool | None = None) -> Opened:
    """The only source of a run with one (tests and tools that look at one source's rows)."""
    return open_one(specs.specs_from_options(cfg)[0], cfg, streaming)


def build_source(cfg, tokenizer, opened: Opened) -> Datasets:
    """One training source's datasets (and its evaluation data), any format, in memory or streamed."""
    choice = choose_format(cfg, opened)
    if choice.format == "text":
        build = stream.build_text_stream if cfg.streaming else text.build_text
        datasets = build(cfg, tokenizer, opened)
    else:
        build = sft_stream.build_sft_stream if cfg.streaming else sft.build_in_memory
        datasets = build(cfg, tokenizer, opened, choice)
    datasets.format = choice.format
    return datasets


def columns_of(cfg) -> Columns:
    return Columns(
        text=cfg.text_column, messages=cfg.messages_column, prompt=cfg.prompt_column, completion=cfg.completion_column,
        instruction=cfg.instruction_column, input=cfg.input_column, output=cfg.output_column,
    )  # fmt: skip


def choose_format(cfg, opened: Opened) -> FormatChoice:
    """formats.detect_format on the training data's columns; with auto and no chat or instruction columns,
    running text (whose column check then names --text_column, as it always has)."""
    source = opened.train[0]
    try:
        choice = formats.detect_format(source.columns, cfg.data_format, columns_of(cfg))
    except UsageError:
        if cfg.data_format != "auto":
            raise
        choice = FormatChoice("text", "auto: no chat or instruction columns, so running text", columns_of(cfg))
    logger.info("Data format: %s (%s)", choice.format, choice.reason)
    return choice
