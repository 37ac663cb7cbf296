"""One table model, three renderings: Markdown, HTML and LaTeX (booktabs).

Cells are plain text (numbers already formatted by the metric table); each renderer escapes
for its own format, so a number is formatted once and shown the same everywhere.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field


@dataclass
class Table:
    """A table: header, rows of text cells, optional column groups, rules and notes.

    ``groups`` are (title, span) pairs over the columns, drawn above the header (a LaTeX
    ``\\multicolumn`` with ``\\cmidrule``); an empty title leaves the columns ungrouped.
    ``rules_after`` holds row indices after which a rule separates row blocks. ``align``
    has one of "l", "r", "c" per column.
    """

    header: list[str]
    rows: list[list[str]]
    align: list[str]
    groups: list[tuple[str, int]] | None = None
    rules_after: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        n = len(self.header)
        # A ragged table is a bug in the code that built it, not a user error.
        assert len(self.align) == n, "one alignment per column"
        assert all(len(r) == n for r in self.rows), "every row needs one cell per column"
        assert self.groups is None or sum(s for _, s in self.groups) == n


# ---------------------------------------------------------------------------------------------
# Markdown


# Labels, scenario names and descriptions come from run records, which anyone can edit: they
# are shown as text, never as Markdown or HTML. Inline markup characters get a backslash
# (CommonMark renders any escaped ASCII punctuation literally; "|" must be escaped inside a
# table row anyway); "<" and "&" become entities, because some Markdown renderers pass raw
# HTML through and do not honour "\\<", so no tag, comment or entity can be formed.
# An "_" between two letters or digits (fashion_mnist) can neither open nor close emphasis in
# CommonMark, so it is left as is; any other "_" is escaped.
_MD_INLINE = re.compile(r"[\\`*\[\]|~$<&]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")
_MD_ENTITY = {"<": "&lt;", "&": "&amp;"}
# Control characters (newlines included) would start a new block or break a table row.
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")
# What turns the start of a line into a block: a heading, quote, list item, thematic break,
# setext underline or an ordered list ("12." / "3)").
_MD_BLOCK_START = re.compile(r"^(\d*)([#>+\-=.)])")


def md_escape(text: str) -> str:
    """``text`` as literal inline Markdown: one line, no markup, no raw HTML.

    ``<script>``, ``[x](javascript:...)``, backticks, ``|``, ``*``/``_`` emphasis, ``~~``,
    ``$`` math and entities all render as the characters they are.
    """
    text = _CONTROL.sub(" ", str(text))
    return _MD_INLINE.sub(lambda m: _MD_ENTITY.get(m.group(0)) or "\\" + m.group(0), text)


def md_line(text: str) -> str:
    """``md_escape(text)`` safe at the start of a line too (a paragraph or list item): a
    leading ``#``, ``>``, ``-``, ``+``, ``=`` or ``1.`` is escaped so it starts no block."""
    text = md_escape(text).strip()
    return _MD_BLOCK_START.sub(lambda m: m.group(1) + "\\" + m.group(2), text, count=1)


def _md_cell(text: str) -> str:
    return md_escape(text).strip()


def to_markdown(table: Table) -> str:
    """GitHub-flavoured Markdown; column groups are folded into the header cells."""
    header = list(table.header)
    if table.groups:
        i = 0
        for title, span in table.groups:
            for j in range(i, i + span):
                if title and header[j]:
                    header[j] = f"{title} {header[j]}"
            i += span
    sep = {"l": ":---", "r": "---:", "c": ":---:"}
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join(sep[a] for a in table.align) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    text = "\n".join(lines) + "\n"
    if table.notes:
        text += "\n" + "\n".join(md_line(n) for n in table.notes) + "\n"
    return text


# ---------------------------------------------------------------------------------------------
# CSV

# A spreadsheet runs a cell that starts with one of these as a formula (OWASP "CSV injection");
# tab and carriage return are stripped by some importers, exposing what follows; the full-width
# forms are folded to ASCII by some locales.
_CSV_FORMULA_START = tuple("=+-@\t\r\n") + ("\uff1d", "\uff0b", "\uff0d", "\uff20")
_CSV_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def csv_cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: a leading ``'`` before a would-be formula.

    Numbers such as ``-1.5`` or ``+2e-05`` are left alone so they stay numeric.
    """
    text = str(text)
    if text.startswith(_CSV_FORMULA_START) and not _CSV_NUMBER.fullmatch(text):
        return "'" + text
    return text


# ---------------------------------------------------------------------------------------------
# HTML


def to_html(table: Table, caption: str = "") -> str:
    """An HTML ``<table>`` fragment (no external resources; styled by the page's CSS)."""
    esc = html.escape
    align = {"l": "left", "r": "right", "c": "center"}
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead>")
    if table.groups and any(t for t, _ in table.groups):
        cells = "".join(f'<th colspan="{s}" class="group">{esc(t)}</th>' for t, s in table.groups)
        out.append(f"<tr>{cells}</tr>")
    cells = "".join(
        f'<th style="text-align:{align[a]}">{esc(h)}</th>'
        for h, a in zip(table.header, table.align)
    )
    out.append(f"<tr>{cells}</tr></thead><tbody>")
    for i, row in enumerate(table.rows):
        cls = ' class="rule"' if (i - 1) in table.rules_after else ""
        cells = "".join(
            f'<td style="text-align:{align[a]}">{esc(c)}</td>' for c, a in zip(row, table.align)
        )
        out.append(f"<tr{cls}>{cells}</tr>")
    out.append("</tbody></table>")
    for note in table.notes:
        out.append(f'<p class="note">{esc(note)}</p>')
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# LaTeX

_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
    "−": "$-$",
    "×": r"$\times$",
    "✓": "yes",  # no extra package needed (\checkmark would need amssymb)
    "✗": "no",
}
_TEX_RE = re.compile("|".join(re.escape(k) for k in _TEX_SPECIAL))


def tex_escape(text: str) -> str:
    """Escape LaTeX's special characters (and map ±, –, −, × to math) in plain text.

    Control characters become spaces: a newline pair would end the paragraph mid-table and a
    raw control byte is invalid input to TeX.
    """
    return _TEX_RE.sub(lambda m: _TEX_SPECIAL[m.group(0)], _CONTROL.sub(" ", str(text)))


def to_latex(table: Table, caption: str, label: str) -> str:
    """A booktabs ``table`` environment, ready to paste (needs ``\\usepackage{booktabs}``)."""
    lines = [
        "% Generated by `fct report` from run records; regenerate rather than edit.",
        "% Requires \\usepackage{booktabs}.",
        "\\begin{table}[t]",
        "  \\centering",
        f"  \\caption{{{tex_escape(caption)}}}",
        f"  \\label{{{label}}}",
        f"  \\begin{{tabular}}{{{''.join(table.align)}}}",
        "    \\toprule",
    ]
    if table.groups and any(t for t, _ in table.groups):
        cells, rules, col = [], [], 1
        for title, span in table.groups:
            if title:
                cells.append(f"\\multicolumn{{{span}}}{{c}}{{{tex_escape(title)}}}")
                rules.append(f"\\cmidrule(lr){{{col}-{col + span - 1}}}")
            else:
                cells.extend([""] * span)
            col += span
        lines.append("    " + " & ".join(cells) + " \\\\")
        lines.append("    " + " ".join(rules))
    lines.append("    " + " & ".join(tex_escape(h) for h in table.header) + " \\\\")
    lines.append("    \\midrule")
    for i, row in enumerate(table.rows):
        lines.append("    " + " & ".join(tex_escape(c) for c in row) + " \\\\")
        if i in table.rules_after and i != len(table.rows) - 1:
            lines.append("    \\midrule")
    lines += ["    \\bottomrule", "  \\end{tabular}"]
    if table.notes:
        notes = " ".join(tex_escape(t) for t in table.notes)
        lines.append(f"  \\par\\smallskip\\parbox{{\\linewidth}}{{\\footnotesize {notes}}}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"
