"""Regenerate the course report from a trained model: ``python -m fer_keras.report --model_dir=RUN``.

Writes ``report.md`` and ``report.html`` (the same content; the HTML needs nothing but the figure
files beside it) to ``--output_dir``, with one sub-folder of figures and data per section:

* ``architecture``: the layer table and parameter counts of the Keras model, the stem and the
  training configuration (``config.json`` of the run, or the one stored in an export);
* ``history``: the training curves and the best epoch, which is the one ``best.keras`` holds;
* ``evaluation``: accuracy (always named with its split), per-class precision/recall/F1 and the
  confusion matrices, via :mod:`fer_keras.evaluate`;
* ``saliency``: saliency, SmoothGrad and Grad-CAM++ maps of one image per class (:mod:`fer_keras.saliency`);
* ``filters``: activation maximisation, feature maps and top-k images of the first and last
  convolutional layer (:mod:`fer_keras.filters`);
* ``gradcheck``: the report's hand derivations checked against Keras (:mod:`fer_keras.gradcheck`).

Each section calls the library functions of the tool that owns it, so the report always shows what
the tools compute. :func:`build_report` is the library entry; the command only turns flags into its
arguments. TensorFlow is imported only when a section needs it, so bad flags fail within a second.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import html
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
from urllib.parse import quote

from absl import flags

from fer_keras import CLASS_NAMES, IMAGE_SIZE, __version__, cli, inference
from fer_keras import data as fer_data
from fer_keras.errors import ConfigError, DataError, FerError, ModelError
from fer_keras.history import (
    atomic_write_text,
    check_replaceable,
    dead_writers_tmp,
    remove_tmp,
    tmp_name,
)
from fer_keras.tta import DEFAULT_CROP_SIZE, TTA_MODES, check_tta

SECTIONS = ("architecture", "history", "evaluation", "saliency", "filters", "gradcheck")
TITLES = {
    "architecture": "Architecture",
    "history": "Training history",
    "evaluation": "Evaluation",
    "saliency": "Saliency maps",
    "filters": "Filter visualisations",
    "gradcheck": "Gradient checks",
}
DATA_SECTIONS = frozenset({"evaluation", "saliency", "filters"})
REPORT_PAGES = ("report.md", "report.html")
ADDED_RECORD = "added.json"  # in the folder a run sets the earlier report aside in
DEFAULT_OUTPUT_DIR = "reports/report"
DEFAULT_FILTER_STEPS = 64
DEFAULT_SALIENCY_SAMPLES = 20
DEFAULT_NUM_FILTERS = 16
DEFAULT_TOP_K = 5
REPORT_TITLE = "ResNet-18 on FER2013: report"
STEM_DESCRIPTIONS = {
    "imagenet": "7x7/2 convolution + 3x3/2 max-pool as in torchvision; 48 -> 12 pixels before stage 1",
    "cifar_pool": "3x3/1 convolution + 2x2/2 max-pool; 48 -> 24 pixels before stage 1",
    "cifar": "3x3/1 convolution, no pooling; 48 -> 48 pixels before stage 1",
}


# --------------------------------------------------------------------------------------------
# Markdown writing helpers


def md_escape(value: Any) -> str:
    """A table cell: pipes escaped and line breaks flattened, so a value cannot break the table. Every break
    :meth:`str.splitlines` knows counts, as :func:`markdown_to_html` splits on them (and Markdown ends lines at
    ``\\r`` too). Emphasis is kept: cells such as the layer table's ``**total**`` are bold on purpose."""
    return " ".join(str(value).replace("|", "\\|").splitlines())


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A pipe table; columns whose index is in ``right`` are right-aligned (numbers)."""
    lines = ["| " + " | ".join(md_escape(h) for h in header) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def md_image(alt: str, link: str) -> str:
    return f"![{alt.replace(']', ')').replace('[', '(')}]({link})"


def _plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _pct(value: float) -> str:
    return f"{value:.2%}"


# --------------------------------------------------------------------------------------------
# Markdown -> HTML for the subset this module writes


_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*$")
_IMAGE_LINE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)$")
_TABLE_SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?$")
_LIST_ITEM = re.compile(r"^[-*]\s+(.*)$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def slug(text: str) -> str:
    """A heading's anchor id: lower case, runs of other characters turned into single dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _inline(text: str) -> str:
    """Inline Markdown: `code`, images, links and **bold**; everything else is escaped text."""
    parts = re.split(r"(`[^`]+`)", text)
    out = []
    for part in parts:
        if len(part) > 1 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
            continue
        s = html.escape(part, quote=True)
        s = re.sub(r"!\[([^\]]*)\]\(([^)\s]+)\)", r'<img src="\2" alt="\1">', s)
        s = re.sub(r"\[([^\]]+)\]\(([^)\s]+)\)", r'<a href="\2">\1</a>', s)
        s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
        out.append(s)
    return "".join(out)


def _cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in _CELL_SPLIT.split(line)]


def _table_html(lines: list[str]) -> str:
    header = _cells(lines[0])
    aligns = ["right" if c.endswith(":") and not c.startswith(":") else
              "center" if c.startswith(":") and c.endswith(":") else "" for c in _cells(lines[1])]

    def row(cells: list[str], tag: str) -> str:
        tds = []
        for i, cell in enumerate(cells):
            align = aligns[i] if i < len(aligns) and aligns[i] else ""
            style = f' style="text-align:{align}"' if align else ""
            tds.append(f"<{tag}{style}>{_inline(cell)}</{tag}>")
        return "<tr>" + "".join(tds) + "</tr>"

    body = "\n".join(row(_cells(line), "td") for line in lines[2:])
    return f"<table>\n<thead>{row(header, 'th')}</thead>\n<tbody>\n{body}\n</tbody>\n</table>"


def markdown_to_html(markdown: str, title: str = REPORT_TITLE) -> str:
    """A complete HTML page for the Markdown subset of the report: headings (with anchor ids),
    paragraphs, pipe tables, stand-alone images (as figures), ``-``/``*`` lists, fenced code and
    inline code, links and bold. Written here to keep the package free of a Markdown dependency."""
    lines = markdown.splitlines()
    blocks: list[str] = []
    paragraph: list[str] = []
    items: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append(f"<p>{_inline(' '.join(paragraph))}</p>")
            paragraph.clear()
        if items:
            blocks.append("<ul>\n" + "\n".join(f"<li>{_inline(i)}</li>" for i in items) + "\n</ul>")
            items.clear()

    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        stripped = line.strip()
        if stripped.startswith("```"):
            flush()
            end = i + 1
            while end < len(lines) and not lines[end].strip().startswith("```"):
                end += 1
            code = "\n".join(lines[i + 1:end])
            blocks.append(f"<pre><code>{html.escape(code)}</code></pre>")
            i = end + 1
            continue
        if not stripped:
            flush()
        elif m := _HEADING.match(stripped):
            flush()
            level, text = len(m.group(1)), m.group(2)
            blocks.append(f'<h{level} id="{slug(text)}">{_inline(text)}</h{level}>')
        elif stripped.startswith("|") and i + 1 < len(lines) and _TABLE_SEPARATOR.match(lines[i + 1].strip()):
            flush()
            end = i + 2
            while end < len(lines) and lines[end].strip().startswith("|"):
                end += 1
            blocks.append(_table_html([ln.strip() for ln in lines[i:end]]))
            i = end
            continue
        elif m := _IMAGE_LINE.match(stripped):
            flush()
            alt = html.escape(m.group(1), quote=True)
            src = html.escape(m.group(2), quote=True)
            blocks.append(f'<figure><img src="{src}" alt="{alt}"><figcaption>{alt}</figcaption></figure>')
        elif m := _LIST_ITEM.match(stripped):
            if paragraph:
                flush()
            items.append(m.group(1))
        elif items and line.startswith("  "):
            items[-1] += " " + stripped
        else:
            if items:
                flush()
            paragraph.append(stripped)
        i += 1
    flush()
    body = "\n".join(blocks)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem;
       line-height: 1.45; color: #222; }}
table {{ border-collapse: collapse; margin: 0.8rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ccc; padding: 0.2rem 0.5rem; }}
th {{ background: #f0f0f0; }}
code, pre {{ font-family: ui-monospace, monospace; background: #f6f6f6; }}
pre {{ padding: 0.6rem; overflow-x: auto; }}
figure {{ margin: 1rem 0; }}
img {{ max-width: 100%; height: auto; }}
figcaption {{ font-size: 0.85rem; color: #555; }}
h2 {{ border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.5rem; }}
</style>
</head>
<body>
{body}
</body>
</html>
"""


# --------------------------------------------------------------------------------------------
# What the report is about


def parse_sections(sections: str | Sequence[str] | None) -> list[str]:
    """Section names in report order; ``None``, empty or ``all`` (alone or among others) means every section."""
    if sections is None:
        return list(SECTIONS)
    names = sections.split(",") if isinstance(sections, str) else list(sections)
    names = [n.strip().lower() for n in names if n and n.strip()]
    if not names or "all" in names:
        return list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ConfigError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)} (or all)")
    return [s for s in SECTIONS if s in names]


class KerasModelUnavailable(ModelError):
    """An export without the training config needed to rebuild its Keras layers: the sections that
    need layers are then omitted with this message instead of failing the whole report."""


@dataclasses.dataclass
class _Context:
    """What the sections share; the model and data are loaded once, when first needed."""

    kind: str
    model_path: Path
    run_dir: Path | None
    train_config: dict | None
    data_arg: str | None
    split: str
    tta: str
    crop_size: int
    out: Path
    filter_steps: int
    saliency_samples: int
    num_filters: int
    top_k: int
    seed: int
    skip_bad_rows: bool = False
    data: fer_data.FerData | None = None
    _model: Any = None
    _predictor: Any = None
    _split: fer_data.Split | None = None
    holdout_label: str | None = None  # set when the split is a run's hold-out, not one of the source's own
    progress: Callable[[str], None] | None = None

    def load_data(self) -> None:
        """Reads the data; ``--split=val`` on data without a labelled val split (the course layout, image
        folders) is the hold-out the run chose its epoch on, rebuilt from the run's recorded settings."""
        from fer_keras.evaluate import run_holdout

        self.data = fer_data.load(self.data_arg, skip_bad_rows=self.skip_bad_rows)
        holdout = run_holdout(self.data, self.split, [str(self.model_path)])
        if holdout is None:
            self._split = self.data.split(self.split)
        else:
            _, self._split, self.holdout_label = holdout

    @property
    def split_label(self) -> str:
        return self.holdout_label or fer_data.split_label(self.split)

    def split_data(self) -> fer_data.Split:
        assert self._split is not None
        return self._split

    def keras_model(self):
        """The Keras model; :class:`KerasModelUnavailable` for an export that cannot be rebuilt."""
        if self._model is None:
            try:
                self._model = inference.load_keras(self.model_path)
            except ModelError as e:
                if self.kind != "saved_model":
                    raise
                raise KerasModelUnavailable(str(e)) from None
        return self._model

    def predictor(self) -> inference.Predictor:
        """The Keras model already loaded for a .keras file; an export runs its serving signature."""
        if self._predictor is None:
            if self.kind == "keras":
                self._predictor = inference.Predictor("keras", self.model_path, keras_model=self.keras_model())
            else:
                self._predictor = inference.load_predictor(self.model_path)
        return self._predictor

    def link(self, path: str | os.PathLike) -> str:
        """A link to ``path`` relative to the report, as Markdown and HTML both need it."""
        rel = os.path.relpath(Path(path).resolve(), self.out.resolve())
        return quote(Path(rel).as_posix(), safe="/._-")


# --------------------------------------------------------------------------------------------
# Sections


def _output_shape(layer) -> str:
    try:
        shape = tuple(layer.output.shape)
    except (AttributeError, ValueError):
        return "?"
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ")"


def _setting(value: Any) -> str:
    """A config value for the table; empty ones are marked, as a blank cell reads as missing."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(map(str, value))
    return "(empty)" if value == "" else str(value)


def _infer_stem(model) -> str | None:
    names = {layer.name for layer in model.layers}
    if "stem_conv" not in names:
        return None
    if tuple(model.get_layer("stem_conv").kernel_size) == (7, 7):
        return "imagenet"
    return "cifar_pool" if "stem_pool" in names else "cifar"


def section_architecture(ctx: _Context) -> str:
    from fer_keras.model import count_params

    model = ctx.keras_model()
    config = ctx.train_config or {}
    stem = config.get("stem") or _infer_stem(model)
    channels = config.get("input_channels", 3 if "to_rgb" in {layer.name for layer in model.layers} else 1)
    trainable = count_params(model, trainable_only=True)
    total = count_params(model, trainable_only=False)
    rows = [(i, layer.name, type(layer).__name__, _output_shape(layer), f"{layer.count_params():,}")
            for i, layer in enumerate(model.layers)]
    rows.append(("", "**total**", "", "", f"**{total:,}**"))
    if stem in STEM_DESCRIPTIONS:
        stem_text = f"**{stem}** ({STEM_DESCRIPTIONS[stem]})"
    else:
        stem_text = "unknown (not a fer_keras ResNet-18)"
    parts = [
        f"Model `{model.name}`: input raw {IMAGE_SIZE}x{IMAGE_SIZE}x1 pixels 0-255 (rescaling and "
        f"normalisation are layers of the model), output {model.outputs[0].shape[-1]} logits "
        f"({', '.join(CLASS_NAMES)}). Stem: {stem_text}; {_plural(int(channels), 'input channel', 'input channels')}.",
        "",
        f"Parameters: **{trainable:,} trainable** of {total:,} in total ({total - trainable:,} non-trainable: "
        "BatchNorm moving means and variances).",
        "",
        md_table(("#", "layer", "type", "output shape", "parameters"), rows, right=(0, 4)),
        "",
        "Residual blocks (`BasicBlock`) are listed as one layer each: two 3x3 convolutions with "
        "BatchNorm, plus a 1x1 convolution shortcut where the width or stride changes.",
    ]
    if ctx.train_config:
        source = "config.json of the run" if ctx.run_dir is not None else "the training config stored in the export"
        settings = [(k, _setting(v)) for k, v in ctx.train_config.items()]
        parts += ["", "### Training configuration", "", f"From {source}:", "",
                  md_table(("setting", "value"), settings)]
        if ctx.run_dir is not None and (ctx.run_dir / "flags.txt").is_file():
            parts += ["", "To train again (or resume) with the same settings:", "", "```",
                      f"python -m fer_keras.train --flagfile={ctx.run_dir / 'flags.txt'}", "```"]
    else:
        parts += ["", "No training configuration is available for this model."]
    return "\n".join(parts)


def _validation_name(ctx: _Context) -> str:
    """The split train.run selected epochs on: PublicTest when its data had one, else a hold-out."""
    config = ctx.train_config or {}
    source = config.get("data") or None
    try:
        same = ctx.data is not None and (
            Path(source or fer_data.SAMPLE_PATH).expanduser().resolve()
            == Path(ctx.data_arg or fer_data.SAMPLE_PATH).expanduser().resolve()
        )
        data = ctx.data if same else fer_data.load(source, skip_bad_rows=ctx.skip_bad_rows)
        has_val = fer_data.has_labelled_val(data)
    except FerError:
        return "the run's validation split (its data is not readable here)"
    if has_val:
        name = fer_data.split_label("val")
    else:
        name = f"a {fer_data.hold_out_name(float(config.get('val_fraction', 0.1)))} of {fer_data.split_label('train')}"
    limit = int(config.get("max_val_examples") or 0)
    return name + (f", stratified subset of at most {limit} images" if limit else "")


def section_history(ctx: _Context) -> str:
    from fer_keras import history as history_lib

    if ctx.run_dir is None:
        what = "a SavedModel export" if ctx.kind == "saved_model" else "a .keras file outside a training run"
        return (f"Omitted: `{ctx.model_path}` is {what}, which keeps no training history. Pass the training "
                "run directory (`--model_dir=RUN`) to include the curves and the best epoch.")
    csv_path, png_path = ctx.run_dir / "history.csv", ctx.run_dir / "history.png"
    history: list[dict] = []
    if csv_path.is_file():
        try:
            history = history_lib.read_history_csv(csv_path)
        except (OSError, ValueError, KeyError) as e:
            raise FerError(f"{csv_path}: cannot read the training history ({e})") from None
    if not history and not png_path.is_file():
        return f"Omitted: `{ctx.run_dir}` has neither history.csv nor history.png (no epoch has finished yet)."
    figure = _mkdir(ctx.out / "history") / "history.png"
    if png_path.is_file():
        atomic_write_text(figure, png_path.read_bytes())
    else:
        history_lib.plot_history(history, figure)
    parts = [md_image("Training history: accuracy (left axis) and loss (right axis) per epoch", ctx.link(figure)), ""]
    if not history:
        parts.append(f"`{csv_path}` is missing, so the best epoch cannot be listed.")
        return "\n".join(parts)
    best = history_lib.best_row(history)

    def value(key: str) -> float:
        return float(best.get(key, float("nan")))

    val_name = _validation_name(ctx)
    planned = (ctx.train_config or {}).get("epochs")
    of_planned = f" of {planned} planned" if planned and int(planned) != len(history) else ""
    parts += [
        f"{_plural(len(history), 'epoch', 'epochs')} trained{of_planned}. The best epoch by validation accuracy, whose "
        f"weights `best.keras` holds (validation split: {val_name}):",
        "",
        md_table(
            ("best epoch", "validation split", "train loss", "train accuracy", "val loss", "val accuracy",
             "learning rate at its end", "seconds"),
            [(best["epoch"], val_name, f"{value('loss'):.4f}", _pct(value("accuracy")), f"{value('val_loss'):.4f}",
              _pct(value("val_accuracy")), f"{value('learning_rate'):.3g}", f"{value('seconds'):.1f}")],
            right=(0, 2, 3, 4, 5, 6, 7),
        ),
    ]
    return "\n".join(parts)


def section_evaluation(ctx: _Context) -> str:
    from fer_keras import evaluate

    predictor = ctx.predictor()
    result = evaluate.evaluate(predictor, ctx.split_data(), ctx.tta, split_name=ctx.split, crop_size=ctx.crop_size,
                               split_label=ctx.holdout_label)
    files = evaluate.write_report(result, ctx.out / "evaluation", source=ctx.data.source if ctx.data else None)
    if ctx.progress:  # the figure a user runs the report for, stated with its split as the evaluate tool does
        ctx.progress(evaluate.summary(result).splitlines()[1])
    tta = f"test-time augmentation {result.tta}" if result.tta != "none" else "no test-time augmentation"
    if result.export_tta not in (None, "none"):
        tta += f" (the export itself averages {result.export_tta} views)"
    parts = [
        f"**{result.split_label}: accuracy {_pct(result.accuracy)}** ({result.num_correct} of "
        f"{result.num_images} images of `{ctx.data.source if ctx.data else ''}`, {tta}); "
        f"macro F1 {result.macro_f1:.3f}, weighted F1 {result.weighted_f1:.3f}.",
    ]
    pair = evaluate.most_confused(result.confusion)
    if pair is not None:
        true, pred, count = pair
        rate = result.normalized_confusion[true, pred]
        parts += ["", f"Most frequent confusion: {CLASS_NAMES[true]} taken for {CLASS_NAMES[pred]} "
                      f"({count} images, {rate:.1%} of {CLASS_NAMES[true]})."]
    if ctx.split == "val":
        parts += ["", "Training picks its best epoch on the validation split (PublicTest unless the data has "
                      "none), so accuracy on that split is slightly optimistic; an unbiased estimate needs images "
                      "no choice was made on (FER2013's PrivateTest rows, withheld from this project and scored "
                      "independently)."]
    rows = [(name, f"{result.precision[i]:.3f}", f"{result.recall[i]:.3f}", f"{result.f1[i]:.3f}",
             int(result.support[i])) for i, name in enumerate(CLASS_NAMES)]
    rows.append(("**macro average**", f"{result.precision[result.present_classes].mean():.3f}",
                 f"{result.recall[result.present_classes].mean():.3f}", f"{result.macro_f1:.3f}",
                 int(result.support.sum())))
    parts += [
        "",
        md_table(("class", "precision", "recall", "F1", "images"), rows, right=(1, 2, 3, 4)),
        "",
        md_image(f"Confusion matrix on {result.split_label} (counts)", ctx.link(files["png_counts"])),
        "",
        md_image(f"Confusion matrix on {result.split_label} (row-normalised: recall on the diagonal)",
                 ctx.link(files["png_normalized"])),
        "",
        f"Per-image predictions: [{files['csv'].name}]({ctx.link(files['csv'])}); "
        f"metrics: [{files['json'].name}]({ctx.link(files['json'])}).",
    ]
    return "\n".join(parts)


def section_saliency(ctx: _Context) -> str:
    from fer_keras import saliency
    from fer_keras.model import LAST_CONV_LAYER

    split = ctx.split_data()
    chosen = saliency.one_per_class(split)
    source = ctx.data.source if ctx.data else ""
    selection = saliency.Selection(
        images=split.images[chosen],
        labels=split.labels[chosen],
        ids=[str(split.ids[i]) for i in chosen],
        # A hold-out's index is into the hold-out the run rebuilt, not into a split of the file.
        sources=[f"{source}:{'train hold-out' if ctx.holdout_label else ctx.split}[{i}]" for i in chosen],
        indices=list(chosen),
        split_label=ctx.split_label,
    )
    model = ctx.keras_model()
    layer = LAST_CONV_LAYER if LAST_CONV_LAYER in {lay.name for lay in model.layers} else _feature_layers(model)[1]
    tta, crop_size = inference.served_views(ctx.kind, ctx.model_path)
    result = saliency.explain(model, selection, ctx.out / "saliency", target="pred", layer=layer,
                              smooth_samples=ctx.saliency_samples, tta=tta, crop_size=crop_size, seed=ctx.seed)
    images = result["images"]
    served = ("" if tta == "none" else
              f" Predictions and probabilities are the export's as served, averaged over its built-in {tta} views.")
    parts = [
        f"The first image of each class in {ctx.split_label}. Each figure shows the input, the vanilla "
        f"saliency |d logit / d pixel|, SmoothGrad ({_plural(ctx.saliency_samples, 'noisy copy', 'noisy copies')} "
        "averaged) and "
        f"Grad-CAM++ on `{layer}`, all for the logit of the predicted class.{served}",
        "",
        md_table(("#", "image id", "true class", "predicted", "probability"),
                 [(r["index"], r["id"], r["true_label"] or "unknown", r["pred_label"],
                   _pct(r["probabilities"][r["pred_label"]])) for r in images], right=(0, 4)),
    ]
    for r in images:
        alt = (f"{r['true_label'] or 'unknown'} (image {r['id']}): predicted {r['pred_label']} "
               f"({_pct(r['probabilities'][r['pred_label']])})")
        parts += ["", md_image(alt, ctx.link(r["figure"]))]
    return "\n".join(parts)


def _feature_layers(model) -> tuple[str, str]:
    """(first, last) layer names with weights and [N, H, W, C] outputs, for models not built here."""
    found = []
    for layer in model.layers:
        try:
            rank = len(layer.output.shape)
        except (AttributeError, ValueError):
            continue
        if rank == 4 and layer.count_params() > 0:
            found.append(layer.name)
    if not found:
        raise ConfigError(f"model {model.name!r} has no convolutional layer to visualise")
    return found[0], found[-1]


def section_filters(ctx: _Context) -> str:
    import keras

    from fer_keras import filters
    from fer_keras.model import LAST_CONV_LAYER, STEM_OUTPUT_LAYER

    model = ctx.keras_model()
    names = {layer.name for layer in model.layers}
    ours = {STEM_OUTPUT_LAYER, LAST_CONV_LAYER} <= names
    layers = filters.DEFAULT_LAYERS if ours else _feature_layers(model)
    split = ctx.split_data()
    image_title = f"({ctx.split_label} #0, id {split.ids[0]})"
    which = (f"of the first convolution after its BatchNorm and ReLU (`{STEM_OUTPUT_LAYER}`: the convolution "
             "itself is linear, so its mean activation follows the image's mean brightness) and of the last "
             f"residual block (`{LAST_CONV_LAYER}`, whose channels are its convolution path and shortcut added, "
             "after ReLU)" if ours
             else f"of `{layers[0]}` and `{layers[1]}`, the first and the last layer with weights and feature maps")
    channels = {layer: int(filters.check_layer(model, layer).output.shape[-1]) for layer in layers}
    fewer = "; all of a layer that has fewer" if ctx.num_filters > min(channels.values()) else ""
    top_k = min(ctx.top_k, len(split))  # as filters.analyse_layer draws them
    parts = [
        f"The first {ctx.num_filters} filters (channels{fewer}) {which}. Activation "
        f"maximisation optimises an input per filter for {_plural(ctx.filter_steps, 'step', 'steps')} "
        "(from uniform noise, "
        "with total-variation and L2 (RMS) regularisers); the activation reached is the filter's mean over "
        "positions, next to its mean on random images. A filter that noise never switches on gets no gradient "
        f"from noise, so it starts from its top {ctx.split_label} image instead; one constant on that image too is "
        f"dead. Feature maps are those of image #0 of "
        f"{ctx.split_label}; the top-{top_k} images are the {ctx.split_label} images with the "
        "highest mean activation.",
    ]
    for layer in layers:
        chosen = list(range(min(ctx.num_filters, channels[layer])))
        keras.utils.set_random_seed(ctx.seed)
        entry, pngs = filters.analyse_layer(
            model, layer, chosen, split, split.images[0], image_title, ctx.out / "filters",
            ctx.top_k, progress=None, split_label=ctx.split_label, steps=ctx.filter_steps, seed=ctx.seed,
        )
        filters.write_figures(pngs)
        shape = " x ".join(str(d) for d in entry["output_shape"][1:])
        rows = [(r["filter"], _filter_outcome(r), f"{r['random_mean_activation']:.3g}", _top_images(r))
                for r in entry["filters"]]
        figures = entry["figures"]
        parts += [
            "", f"### `{layer}` (output {shape})", "",
            f"{filters.summarise_layer(entry)}.", "",
            md_image(f"{layer}: inputs maximising each filter's mean activation", ctx.link(figures["maximization"])),
            "",
            md_image(f"{layer}: feature maps of {ctx.split_label} image #0", ctx.link(figures["feature_maps"])),
            "",
            md_image(f"{layer}: top-{top_k} {ctx.split_label} images per filter", ctx.link(figures["top_k"])),
            "",
            md_table(("filter", "activation reached", "random-input mean", f"top-{top_k} images (id, true class)"),
                     rows, right=(0, 2)),
        ]
    return "\n".join(parts)


def _top_images(row: dict) -> str:
    """A filter's top images (id, true class) for the filters table; none for a dead filter, whose "top" images are
    merely the first of equals."""
    from fer_keras import filters

    if row["status"] == filters.DEAD:
        return f"none above {row['top_k'][0]['activation']:.3g}" if row["top_k"] else "none"
    return ", ".join(f"{t['id']} ({t['label_name'] or '?'})" for t in row["top_k"])


def _filter_outcome(row: dict) -> str:
    """The activation reached, and how, for the filters table."""
    from fer_keras import filters

    reached = f"{row['max_activation']:.3g}"
    if row["status"] == filters.DEAD:
        return f"{reached} (dead)"
    start = "" if row["start"] == "noise" else f"start: image {row['start']['id']}, {row['start_activation']:.3g}"
    if row["status"] == filters.NOT_MAXIMISED:
        return f"{reached} (not maximised{', ' + start if start else ''})"
    return f"{reached} ({start})" if start else reached


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


GRADCHECK_GROUPS = (
    ("Output size of convolution and pooling", lambda name: "output size" in name),
    ("BatchNorm backward pass", lambda name: name.startswith("batchnorm")),
    ("BatchNorm backward pass through the model's fused layer (float32)",
     lambda name: name.startswith("fused batchnorm")),
    ("Softmax cross-entropy gradient", lambda name: name.startswith("softmax")),
)


def section_gradcheck(ctx: _Context) -> str:
    from fer_keras import gradcheck

    report = gradcheck.run_all(ctx.out / "gradcheck", seed=ctx.seed)
    results = report.results
    verdict = (f"All {len(results)} checks pass." if report.passed else
               f"**{len(report.failed)} of {len(results)} checks FAIL**: {', '.join(r.name for r in report.failed)}.")
    parts = [
        "The report's hand derivations against what Keras computes: the output-size formula "
        "floor((W + 2p - k) / s) + 1 against Conv2D and MaxPool2D shapes; the BatchNorm backward pass "
        "and dL/dz = (softmax(z) - y) / N against GradientTape in float64 and against central differences "
        "of the losses computed in numpy (float64), and the BatchNorm formulas "
        "against the model's fused BatchNorm layer in float32. A check passes when its max "
        f"absolute and max relative error are both within the tolerance. {verdict}",
    ]
    used: set[int] = set()
    groups = [(title, [r for r in results if match(r.name)]) for title, match in GRADCHECK_GROUPS]
    for _, rows in groups:
        used.update(id(r) for r in rows)
    others = [r for r in results if id(r) not in used]
    if others:
        groups.append(("Other checks", others))
    for title, rows in groups:
        if not rows:
            continue
        parts += ["", f"### {title}", "", gradcheck.format_table(rows)]
        for r in rows:
            examples = r.details.get("examples")
            if examples:
                parts += ["", f"- {r.name}: {r.details.get('disagreements')} of {r.details.get('axis_comparisons')} "
                              f"axis comparisons disagree with Keras, e.g. {examples[0]}."]
    parts += ["", f"Details: [gradcheck.md]({ctx.link(report.markdown_path)}), "
                  f"[gradcheck.json]({ctx.link(report.json_path)})."]
    return "\n".join(parts)


SECTION_BUILDERS: dict[str, Callable[[_Context], str]] = {
    "architecture": section_architecture,
    "history": section_history,
    "evaluation": section_evaluation,
    "saliency": section_saliency,
    "filters": section_filters,
    "gradcheck": section_gradcheck,
}


# --------------------------------------------------------------------------------------------
# The report


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")


def check_outputs(out: Path, sections: Sequence[str] = SECTIONS) -> None:
    """Refuses, before minutes of sections, a ``report.md`` or ``report.html`` in ``out`` that is not an earlier
    report, and the files of the chosen sections that their tools would refuse (a ``saliency.json``, ``maps.npz``,
    ``gradcheck.json`` or ``gradcheck.md`` they did not write): an ``--output_dir`` naming a folder of the user's
    own must not lose their files, nor fail only after the sections before it have run."""
    page_head = markdown_to_html("").split("</title>")[0] + "</title>"
    check_replaceable(out / "report.md", (f"# {REPORT_TITLE}\n".encode(),), "a fer_keras report", "--output_dir")
    check_replaceable(out / "report.html", (page_head.encode(),), "a fer_keras report", "--output_dir")
    if "saliency" in sections:
        from fer_keras import saliency

        saliency.check_outputs(out / "saliency")
    if "gradcheck" in sections:
        from fer_keras import gradcheck

        gradcheck.check_outputs(out / "gradcheck")


def build_report(
    model_path: str | os.PathLike | None,
    data: str | os.PathLike | None = None,
    output_dir: str | os.PathLike = DEFAULT_OUTPUT_DIR,
    sections: str | Sequence[str] | None = None,
    *,
    split: str = "val",
    tta: str = "none",
    crop_size: int = DEFAULT_CROP_SIZE,
    filter_steps: int = DEFAULT_FILTER_STEPS,
    saliency_samples: int = DEFAULT_SALIENCY_SAMPLES,
    num_filters: int = DEFAULT_NUM_FILTERS,
    top_k: int = DEFAULT_TOP_K,
    seed: int = 0,
    skip_bad_rows: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Writes ``report.md`` and ``report.html`` with their figures to ``output_dir``; returns the
    Markdown file's path. A run that fails or is interrupted leaves the earlier report there as it was.

    ``model_path`` is a training run directory, a ``.keras`` file or an export (None: the shipped
    model). Everything that can be checked without TensorFlow (sections, split, TTA, the model path,
    the data) is checked before any section runs, so a typo fails before minutes of work. Bad data rows are
    skipped when ``skip_bad_rows`` is set or the run was trained with ``--skip_bad_rows``.
    """
    chosen = parse_sections(sections)
    split_key = fer_data.canonical_split(split)
    check_tta(tta, crop_size)
    _check_positive(filter_steps=filter_steps, saliency_samples=saliency_samples, num_filters=num_filters,
                    top_k=top_k)
    out = Path(output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a directory")
    if out.is_dir():
        _clear_dead_runs(out)
    check_outputs(out, chosen)
    kind, resolved = inference.resolve(model_path)
    run_dir = inference.find_run_dir(model_path)
    train_config = inference.training_config(kind, resolved, run_dir)
    ctx = _Context(
        kind=kind, model_path=resolved,
        run_dir=run_dir, train_config=train_config,
        data_arg=None if data is None or str(data) == "" else str(data), split=split_key, tta=tta,
        crop_size=crop_size, out=out, filter_steps=filter_steps, saliency_samples=saliency_samples,
        num_filters=num_filters, top_k=top_k, seed=seed,
        skip_bad_rows=skip_bad_rows or bool((train_config or {}).get("skip_bad_rows")), progress=progress,
    )
    if DATA_SECTIONS.intersection(chosen):
        ctx.load_data()
        if "evaluation" in chosen and not ctx.split_data().labeled:
            raise DataError(f"{ctx.data.source}: {ctx.split_label} has images without labels; the evaluation "
                            "section needs labels (choose another --split or leave out evaluation)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out}: cannot create the output folder ({e.strerror or e})") from None

    with _previous_kept(out, chosen):
        _write_sections(ctx, chosen)
    return out / "report.md"


@contextlib.contextmanager
def _previous_kept(out: Path, sections: Sequence[str]) -> Iterator[None]:
    """Keeps the report already in ``out`` until the new one is complete: its pages are moved into a hidden folder,
    and the chosen sections' folders copied there, while the sections run, and all are put back if the run fails.
    So a failed or interrupted run leaves the earlier report as it was, and a killed one no report.md rather than
    one describing other figures (:func:`_clear_dead_runs`)."""
    backup = out / tmp_name("report")
    backup.mkdir()
    added = [name for name in sections if not (out / name).exists()]
    recorded = None  # until the record is written the copies may be partial, and nothing has changed yet
    try:
        for name in sections:
            if (out / name).is_dir():
                shutil.copytree(out / name, backup / name, symlinks=True)
        atomic_write_text(backup / ADDED_RECORD, json.dumps(added))  # also marks the copies complete
        recorded = added
        for name in REPORT_PAGES:
            if (out / name).exists():
                os.replace(out / name, backup / name)
        yield
    except BaseException:
        _put_back(out, backup, recorded)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _clear_dead_runs(out: Path) -> None:
    """Before anything checks or changes ``out``: puts back the reports that killed runs of :func:`_previous_kept`
    set aside there, and removes the other temporaries of dead writers (a killed section's half-written file)."""
    for tmp in dead_writers_tmp(out):
        if tmp.name.startswith(".tmp-report-") and tmp.is_dir():
            _put_back(out, tmp, _read_added(tmp))
        else:
            remove_tmp(tmp)


def _read_added(backup: Path) -> list | None:
    """The section folders a killed run had added, from its record; None when it was killed before writing it."""
    try:
        added = json.loads((backup / ADDED_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return added if isinstance(added, list) else None


def _put_back(out: Path, backup: Path, added: list | None) -> None:
    """Restores the report :func:`_previous_kept` set aside in ``backup``: the section folders the run ``added``
    are removed and the copied ones replace theirs, and the pages come back last, so a report.md is back only beside
    its own figures. Nothing is restored while ``out`` has a report.md (the run had not begun the sections, or it had
    written its report), or when ``added`` is None (the run had not finished copying, so had changed nothing)."""
    if added is not None and not (out / "report.md").exists():
        for name in added:
            if name in SECTIONS:
                shutil.rmtree(out / name, ignore_errors=True)
        for folder in sorted(p for p in backup.iterdir() if p.is_dir() and p.name in SECTIONS):
            shutil.rmtree(out / folder.name, ignore_errors=True)
            os.replace(folder, out / folder.name)
        for name in REPORT_PAGES:
            if (backup / name).exists():
                os.replace(backup / name, out / name)
    shutil.rmtree(backup, ignore_errors=True)


def _write_sections(ctx: _Context, chosen: Sequence[str]) -> None:
    """Runs the chosen sections into ``ctx.out`` and writes ``report.md`` and ``report.html`` describing them."""
    import keras
    import tensorflow as tf

    bodies = []
    started = time.monotonic()
    for number, name in enumerate(chosen, start=1):
        if ctx.progress:
            ctx.progress(f"[{number}/{len(chosen)}] {TITLES[name].lower()}")
        try:
            body = SECTION_BUILDERS[name](ctx)
        except KerasModelUnavailable as e:
            body = f"Omitted: this section needs the model's Keras layers. {e}."
        bodies.append(f"## {TITLES[name]}\n\n{body}")
    model_text = f"`{ctx.model_path}` ({'Keras model' if ctx.kind == 'keras' else 'SavedModel export'})"
    if ctx.run_dir is not None:
        model_text += f" of the training run `{ctx.run_dir}`"
    data_text = f" Data: `{ctx.data.source}`, split {ctx.split_label}." if ctx.data is not None else ""
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = [
        f"# {REPORT_TITLE}",
        "",
        f"Model: {model_text}.{data_text} Generated {stamp} by fer_keras {__version__} "
        f"(TensorFlow {tf.__version__}, Keras {keras.__version__}) in {time.monotonic() - started:.0f} s.",
        "",
        "Contents:",
        "",
        *(f"- [{TITLES[name]}](#{slug(TITLES[name])})" for name in chosen),
    ]
    markdown = "\n".join(header) + "\n\n" + "\n\n".join(bodies) + "\n"
    from fer_keras.predict import atomic_write

    atomic_write(ctx.out / "report.html", markdown_to_html(markdown))
    atomic_write(ctx.out / "report.md", markdown)


# --------------------------------------------------------------------------------------------
# Entrypoint


def define_flags() -> None:
    flags.DEFINE_string("model_dir", None, "A training run directory (its best.keras and history), a .keras "
                        "file or a SavedModel export (default: the shipped saved_models/fer_resnet18).")
    flags.DEFINE_string("data", None, "FER2013 in any layout fer_keras.data reads (default: the bundled sample).")
    flags.DEFINE_string("split", "val", "Labeled split for evaluation, saliency and filters: train, "
                        "val (PublicTest) or test (PrivateTest).")
    flags.DEFINE_enum("tta", "none", TTA_MODES, "Test-time augmentation for the evaluation section.")
    flags.DEFINE_integer("crop_size", DEFAULT_CROP_SIZE, "Crop side in pixels for --tta=tencrop; a model "
                         "trained with --input_crop is shown crops of its own size instead.")
    flags.DEFINE_string("output_dir", DEFAULT_OUTPUT_DIR, "Folder for report.md, report.html and the figures.")
    flags.DEFINE_list("sections", list(SECTIONS), f"Sections to include, in report order: {', '.join(SECTIONS)}.")
    flags.DEFINE_integer("filter_steps", DEFAULT_FILTER_STEPS, "Activation maximisation steps per layer.")
    flags.DEFINE_integer("saliency_samples", DEFAULT_SALIENCY_SAMPLES, "Noisy copies averaged by SmoothGrad.")
    flags.DEFINE_integer("num_filters", DEFAULT_NUM_FILTERS, "Filters shown per layer (the first ones).")
    flags.DEFINE_integer("top_k", DEFAULT_TOP_K, "Top-activating images shown per filter.")
    cli.define_seed(0, "Random seed of SmoothGrad noise, activation maximisation and gradcheck inputs.")
    cli.define_skip_bad_rows("On by itself for a run trained with --skip_bad_rows.")
    for name in ("filter_steps", "saliency_samples", "num_filters", "top_k"):
        flags.register_validator(name, lambda v: v >= 1, f"--{name} must be >= 1")
    flags.register_validator("output_dir", lambda v: bool(v and v.strip()), "--output_dir must not be empty")
    flags.register_validator("crop_size", lambda v: 0 < v <= IMAGE_SIZE, f"--crop_size must be in 1-{IMAGE_SIZE}")


def main(argv: Sequence[str]) -> None:
    f = flags.FLAGS

    def progress(message: str) -> None:
        print(message, flush=True)

    path = build_report(
        f.model_dir, f.data, f.output_dir, f.sections, split=f.split, tta=f.tta, crop_size=f.crop_size,
        filter_steps=f.filter_steps, saliency_samples=f.saliency_samples, num_filters=f.num_filters,
        top_k=f.top_k, seed=f.seed, skip_bad_rows=f.skip_bad_rows, progress=progress,
    )
    print(f"wrote {path} and {path.with_suffix('.html')}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
    sys.exit(0)
