"""Author-year citations in round brackets: {cite:p} gives (Graves, 2016), {cite:t} Graves (2016),
and several keys in one {cite:p} are separated by semicolons.

sphinxcontrib-bibtex's own author_year style uses square brackets; this registers the same style
with round ones under the name "author_year_round", and pybtex's plain bibliography style with
labels in the same author-year form under the name "plain_authoryear" (book/_config.yml selects
both). Loaded by Sphinx as a local extension; it is not part of the looplm package."""

import dataclasses

import pybtex.plugin
import sphinxcontrib.bibtex.plugin
from pybtex.style.formatting.plain import Style as PlainStyle
from pybtex.style.labels import BaseLabelStyle
from pybtex.style.sorting.author_year_title import SortingStyle as AuthorYearTitleSorting
from sphinxcontrib.bibtex.style.referencing import BracketStyle
from sphinxcontrib.bibtex.style.referencing.author_year import AuthorYearReferenceStyle


def _round() -> BracketStyle:
    return BracketStyle(left="(", right=")")


def _round_semicolons() -> BracketStyle:
    return BracketStyle(left="(", right=")", sep="; ")


@dataclasses.dataclass
class RoundAuthorYearReferenceStyle(AuthorYearReferenceStyle):
    bracket_parenthetical: BracketStyle = dataclasses.field(default_factory=_round_semicolons)
    bracket_textual: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_author: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_label: BracketStyle = dataclasses.field(default_factory=_round)
    bracket_year: BracketStyle = dataclasses.field(default_factory=_round)


sphinxcontrib.bibtex.plugin.register_plugin(
    "sphinxcontrib.bibtex.style.referencing", "author_year_round", RoundAuthorYearReferenceStyle)


def _names(entry) -> str:
    persons = entry.persons.get("author") or entry.persons.get("editor") or []
    last = [" ".join(n.render_as("text") for n in p.rich_last_names) for p in persons]
    if "others" in last[1:]:  # "Yu, Qiying and others"
        return f"{last[0]} et al."
    if len(last) == 1:
        return last[0]
    if len(last) == 2:
        return f"{last[0]} and {last[1]}"
    return f"{last[0]} et al." if last else entry.key


class AuthorYearLabelStyle(BaseLabelStyle):
    """Bibliography labels that read like the citations in the text: Graves, 2016; Zhu et al., 2025.
    Two works with the same label (a paper and its code) are told apart by their titles, as the
    citations in the text are: each links to its own entry."""

    def format_labels(self, sorted_entries):
        for entry in sorted_entries:
            yield f"{_names(entry)}, {entry.fields.get('year', 'n.d.')}"


class BracesIgnoredSorting(AuthorYearTitleSorting):
    """Sort by author, year and title as pybtex does, but file {ByteDance Seed} under B, not
    after Z: braces only protect a name from being split."""

    def person_key(self, person):
        return super().person_key(person).replace("{", "").replace("}", "")


class PlainAuthorYearStyle(PlainStyle):
    default_label_style = AuthorYearLabelStyle
    default_sorting_style = BracesIgnoredSorting


pybtex.plugin.register_plugin("pybtex.style.formatting", "plain_authoryear", PlainAuthorYearStyle)


def setup(app):
    return {"parallel_read_safe": True, "parallel_write_safe": True}
