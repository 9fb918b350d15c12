"""Pictures of TIS-DPO token weights: an HTML page, a token figure like the paper's Fig. 4, a histogram.

:func:`show_weights` reads a weights file written by :func:`tidpo.weights.estimate.estimate_weights` and
colours every response token by its weight with a diverging map centred on 1.0 (blue below, white at 1,
red above): the tokens TIS-DPO emphasises stand out in red, the ones it plays down in blue. Tokens cut by
truncation (never trained on) are grey.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

from tidpo.weights.records import read_records

__all__ = ["readable_token", "show_weights"]

_SIDES = ("chosen", "rejected")
_REQUIRED = tuple(f"{name}_{what}" for name in _SIDES for what in ("scores", "weights", "tokens"))
_UNSCORED = "#d9d9d9"
_CMAP = "RdBu_r"
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
#: Characters of the PNG panels per line, and their font size (points).
_COLUMNS, _FONT_SIZE = 64, 9.0


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (``bytes_to_unicode``) inverted: character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


def readable_token(token: str) -> str:
    """A vocabulary string as the text it stands for.

    Byte-level BPE tokens (GPT-2, Llama 3, SmolLM: ``"Ġworld"``, ``"Ċ"``, ``"Ã©"``) are decoded from their
    byte alphabet when they form valid UTF-8; SentencePiece byte tokens (``"<0x0A>"``) become their
    character; otherwise the whitespace markers ``"▁"`` / ``"Ġ"`` become spaces and ``"Ċ"`` / ``"ĉ"`` a
    newline / tab (e.g. a piece of a multi-byte character stays as it is).
    """
    token = str(token)
    match = _BYTE_TOKEN.fullmatch(token)
    if match and int(match.group(1), 16) < 0x80:
        return chr(int(match.group(1), 16))
    decoder = _byte_decoder()
    if token and all(ch in decoder for ch in token):
        try:
            return bytes(decoder[ch] for ch in token).decode("utf-8")
        except UnicodeDecodeError:
            pass
    return token.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n").replace("ĉ", "\t")


def _shown(token: str) -> str:
    """Display form of a readable token on one line: newline → ↵, tab → →, empty → ∅."""
    text = readable_token(token).replace("\r", "").replace("\n", "↵").replace("\t", "→")
    return text or "∅"


# ----------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------


def _load(weights_path: Path) -> list[dict]:
    records = read_records(weights_path)
    if not records:
        raise ValueError(f"{weights_path} holds no records")
    for position, record in enumerate(records):
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise ValueError(f"{weights_path} record {position} has no {missing[0]!r}; show_weights needs the files "
                             "written by estimate_weights (scores, weights and tokens per side)")
        for name in _SIDES:
            lengths = {len(record[f"{name}_{what}"]) for what in ("scores", "weights", "tokens")}
            if len(lengths) != 1:
                raise ValueError(f"{weights_path} row {record.get('row', position)}: {name}_scores, {name}_weights "
                                 f"and {name}_tokens differ in length")
    return records


def _num_scored(record: Mapping, name: str) -> int:
    return int(record.get(f"{name}_num_scored", len(record[f"{name}_scores"])))


def _select(records: list[dict], rows: Sequence[int], weights_path: Path) -> list[dict]:
    by_row = {record.get("row", position): record for position, record in enumerate(records)}
    chosen = []
    for row in rows:
        if row not in by_row:
            raise ValueError(f"row {row} is not in {weights_path} (it has rows {min(by_row)}..{max(by_row)})")
        chosen.append(by_row[row])
    return chosen


def _side_values(records: Sequence[Mapping], name: str, what: str) -> list[float]:
    return [v for record in records for v in record[f"{name}_{what}"][:_num_scored(record, name)]]


def _norm(records: Sequence[Mapping]):
    """A two-slope colour norm centred on weight 1.0 over every scored weight of ``records``."""
    from matplotlib.colors import TwoSlopeNorm

    values = [v for name in _SIDES for v in _side_values(records, name, "weights")] or [1.0]
    return TwoSlopeNorm(vcenter=1.0, vmin=min(min(values), 1.0 - 1e-3), vmax=max(max(values), 1.0 + 1e-3))


def _stats(records: Sequence[Mapping], name: str) -> dict:
    weights, scores = _side_values(records, name, "weights"), _side_values(records, name, "scores")
    n = len(weights)
    mean = sum(weights) / n if n else math.nan
    std = math.sqrt(sum((w - mean) ** 2 for w in weights) / n) if n else math.nan
    return {"tokens": n, "mean": mean, "std": std, "min": min(weights) if n else math.nan,
            "max": max(weights) if n else math.nan, "rhat_mean": sum(scores) / len(scores) if scores else math.nan}


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, Mapping) else str(m)
                         for m in prompt)
    return "" if prompt is None else str(prompt)


# ----------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1em; }
td, th { border: 1px solid #bbb; padding: 0.2em 0.6em; text-align: right; }
.prompt { white-space: pre-wrap; background: #f4f4f4; padding: 0.5em; border-radius: 4px; }
.pair { display: flex; gap: 1.5em; }
.side { flex: 1; min-width: 0; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9; }
.tok { border-radius: 2px; padding: 0.1em 0; }
.legend { height: 1em; width: 24em; border: 1px solid #999; }
.ticks { display: flex; justify-content: space-between; width: 24em; font-size: 0.85em; }
"""


def _hex(cmap, norm, weight: float) -> str:
    from matplotlib.colors import to_hex

    return to_hex(cmap(norm(weight)))


def _text_colour(background: str) -> str:
    r, g, b = (int(background[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "#fff"


def _token_spans(record: Mapping, name: str, cmap, norm, max_tokens: int) -> str:
    tokens, weights, scores = (record[f"{name}_{what}"] for what in ("tokens", "weights", "scores"))
    scored = _num_scored(record, name)
    spans = []
    for position, token in enumerate(tokens[:max_tokens]):
        text = readable_token(token)
        shown = html.escape(text.replace("\n", "↵").replace("\t", "→") or "∅")
        if position < scored:
            colour = _hex(cmap, norm, weights[position])
            tip = f"weight {weights[position]:.4f} · r̂ {scores[position]:+.4f} · token {token!r}"
        else:
            colour, tip = _UNSCORED, f"not scored: cut by truncation (weight 0, not trained) · token {token!r}"
        spans.append(f'<span class="tok" style="background:{colour};color:{_text_colour(colour)}" '
                     f'title="{html.escape(tip, quote=True)}">{shown}</span>' + ("<br>" if "\n" in text else ""))
    if len(tokens) > max_tokens:
        spans.append(f" <em>… {len(tokens) - max_tokens} more tokens</em>")
    return "".join(spans)


def _legend(cmap, norm) -> str:
    stops = ", ".join(_hex(cmap, norm, norm.inverse(i / 10)) for i in range(11))
    return (f'<div class="legend" style="background:linear-gradient(to right, {stops})"></div>'
            f'<div class="ticks"><span>{norm.vmin:.3f}</span><span>1.0</span><span>{norm.vmax:.3f}</span></div>'
            f'<p>Token weight: blue &lt; 1 (played down), white = 1, red &gt; 1 (emphasised); '
            f'<span class="tok" style="background:{_UNSCORED}">grey</span>: cut by truncation. Hover a token for '
            'its weight and score r̂ = log π⁺ − log π⁻.</p>')


def _summary_table(records: Sequence[Mapping]) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("side", "tokens", "mean w", "std w", "min w", "max w", "mean r̂"))
    body = []
    for name in _SIDES:
        s = _stats(records, name)
        cells = [f"{s['tokens']}"] + [f"{s[k]:.4f}" for k in ("mean", "std", "min", "max", "rhat_mean")]
        body.append(f"<tr><th>{name}</th>{''.join(f'<td>{c}</td>' for c in cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _html(records, selected, weights_path: Path, cmap, norm, max_tokens: int) -> str:
    sections = []
    for record in selected:
        sides = "".join(f'<div class="side"><h3>{name}</h3><div class="tokens">'
                        f"{_token_spans(record, name, cmap, norm, max_tokens)}</div></div>" for name in _SIDES)
        sections.append(f"<section><h2>Row {html.escape(str(record.get('row')))}</h2>"
                        f'<div class="prompt">{html.escape(_prompt_text(record.get("prompt")))}</div>'
                        f'<div class="pair">{sides}</div></section>')
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>TIS-DPO token weights</title>"
            f"<style>{_STYLE}</style></head><body><h1>Token weights: {html.escape(weights_path.name)}</h1>"
            f"{_legend(cmap, norm)}<h2>Summary over all {len(records)} rows (scored tokens)</h2>"
            f"{_summary_table(records)}{''.join(sections)}</body></html>\n")


# ----------------------------------------------------------------------------------------------------
# PNG
# ----------------------------------------------------------------------------------------------------


def _layout(record: Mapping, name: str, max_tokens: int) -> tuple[list[tuple[int, int, str, int]], int]:
    """``[(line, column, text, position)]`` of the monospace flow layout of a response, and its line count."""
    placed, line, column = [], 0, 0
    tokens = record[f"{name}_tokens"]
    for position, token in enumerate(tokens[:max_tokens]):
        text = _shown(token)[:_COLUMNS]
        if column + len(text) > _COLUMNS and column > 0:
            line, column = line + 1, 0
        placed.append((line, column, text, position))
        column += len(text)
        if "\n" in readable_token(token):
            line, column = line + 1, 0
    if len(tokens) > max_tokens:
        more = f" … {len(tokens) - max_tokens} more"
        if column + len(more) > _COLUMNS:
            line, column = line + 1, 0
        placed.append((line, column, more, -1))
    return placed, line + 1


def _draw_panel(ax, record: Mapping, name: str, cmap, norm, max_tokens: int, lines: int) -> None:
    from matplotlib.patches import Rectangle

    placed, _ = _layout(record, name, max_tokens)
    scored, weights = _num_scored(record, name), record[f"{name}_weights"]
    for line, column, text, position in placed:
        ink = "#000"
        if position >= 0:  # a token (position -1: the "… N more" note)
            colour = _hex(cmap, norm, weights[position]) if position < scored else _UNSCORED
            ax.add_patch(Rectangle((column, line + 0.08), len(text), 0.84, facecolor=colour, edgecolor="none"))
            ink = _text_colour(colour)
        ax.text(column, line + 0.5, text, family="DejaVu Sans Mono", fontsize=_FONT_SIZE, va="center", ha="left",
                parse_math=False, color=ink)
    ax.set_xlim(0, _COLUMNS)
    ax.set_ylim(lines, 0)
    ax.set_axis_off()
    ax.set_title(f"row {record.get('row')} · {name}", fontsize=_FONT_SIZE + 1, loc="left")


def _tokens_png(selected, path: Path, cmap, norm, max_tokens: int) -> None:
    import warnings

    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    heights = [max(_layout(record, name, max_tokens)[1] for name in _SIDES) for record in selected]
    line_in, char_in = 1.7 * _FONT_SIZE / 72, 0.602 * _FONT_SIZE / 72
    title_lines, bar_lines = 2.5, 4.0
    fig = Figure(figsize=(2 * _COLUMNS * char_in + 1.0, (sum(heights) + title_lines * len(selected) + bar_lines)
                          * line_in + 0.4))
    grid = fig.add_gridspec(len(selected) + 1, 2, height_ratios=[h + title_lines for h in heights] + [bar_lines],
                            left=0.02, right=0.98, top=0.99, bottom=0.02, wspace=0.06, hspace=0.0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        for i, record in enumerate(selected):
            for j, name in enumerate(_SIDES):
                panel = grid[i, j].subgridspec(2, 1, height_ratios=[title_lines, heights[i]])[1]
                _draw_panel(fig.add_subplot(panel), record, name, cmap, norm, max_tokens, heights[i])
        bar = fig.add_subplot(grid[-1, :].subgridspec(3, 3, height_ratios=[1.2, 1, 1.8])[1, 1])
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar, orientation="horizontal",
                     label="token weight (grey: cut by truncation)")
        fig.savefig(path, dpi=120)


def _histogram_png(records, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6))
    axes = fig.subplots(1, 2)
    for ax, what, label in zip(axes, ("weights", "scores"), ("token weight", "r̂ = log π⁺ − log π⁻"), strict=True):
        both = [v for name in _SIDES for v in _side_values(records, name, what)]
        bins = np.histogram_bin_edges(both or [0.0], bins=40)  # shared, so the two sides' bars line up
        for name, colour in zip(_SIDES, ("tab:red", "tab:blue"), strict=True):
            values = _side_values(records, name, what)
            if values:
                mean = sum(values) / len(values)
                ax.hist(values, bins=bins, alpha=0.55, color=colour, label=f"{name} (n={len(values)}, mean {mean:.3f})")
        ax.axvline(1.0 if what == "weights" else 0.0, color="#444", linewidth=0.8, linestyle="--")
        ax.set_xlabel(label)
        ax.set_ylabel("tokens")
        ax.legend(fontsize=8)
    fig.suptitle(f"TIS-DPO token weights and scores over {len(records)} pairs (scored tokens)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------------------------------
# entry point
# ----------------------------------------------------------------------------------------------------


def show_weights(weights_path, out_dir, *, rows: Sequence[int] = (0, 1, 2), max_tokens: int = 200) -> dict[str, Path]:
    """Render a weights file: an HTML page, a token figure and a histogram, written into ``out_dir``.

    - ``weights.html``: self-contained (inline CSS, no scripts, every text HTML-escaped). A colour legend, a
      summary table over all rows of the file (per side: scored tokens, mean / std / min / max weight, mean
      r̂), then for each selected row its prompt and the chosen and rejected responses side by side, each
      token a span coloured by its weight, with weight, r̂ and the raw vocabulary string as a tooltip.
    - ``weights_tokens.png``: the same coloured tokens of the selected rows (chosen left, rejected right),
      monospace, with a colour bar.
    - ``weights_histogram.png``: histograms of the weights and of r̂ per side over all rows.

    Colours: ``RdBu_r`` through a two-slope norm with 1.0 at the centre (white) and the file's smallest /
    largest scored weight at the ends. Tokens beyond ``*_num_scored`` (cut by truncation) are grey.
    Whitespace markers are shown as spaces (:func:`readable_token`).

    Args:
        weights_path: a weights file of :func:`tidpo.weights.estimate.estimate_weights` (``.jsonl``,
            ``.json`` or ``.parquet``).
        out_dir: output folder (created if needed).
        rows: the ``row`` values to show.
        max_tokens: tokens shown per response (the rest is summarised as "… N more").

    Returns:
        ``{"html": Path, "tokens_png": Path, "histogram_png": Path}``.

    Raises:
        FileNotFoundError: ``weights_path`` does not exist.
        ValueError: an empty file, records without scores / weights / tokens or with lists of different
            lengths, a requested row not in the file, ``rows`` empty or ``max_tokens`` < 1.
    """
    from matplotlib import colormaps

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    rows = list(rows)
    if not rows:
        raise ValueError("rows is empty; give at least one row to show")
    weights_path, out_dir = Path(weights_path), Path(out_dir)
    records = _load(weights_path)
    selected = _select(records, rows, weights_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    cmap, norm = colormaps[_CMAP], _norm(records)
    paths = {"html": out_dir / "weights.html", "tokens_png": out_dir / "weights_tokens.png",
             "histogram_png": out_dir / "weights_histogram.png"}
    paths["html"].write_text(_html(records, selected, weights_path, cmap, norm, max_tokens), encoding="utf-8")
    _tokens_png(selected, paths["tokens_png"], cmap, norm, max_tokens)
    _histogram_png(records, paths["histogram_png"])
    return paths
