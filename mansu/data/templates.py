"""Prompt templates as data: how a record becomes the context a model reads and the continuation it is scored on.
One definition, used by scoring (mansu.metrics), unlearning (mansu.unlearn.data) and attribution
(mansu.attribution.data), and recorded in a run's config.

A template is a string with up to three fields (literal braces are written {{ and }}):

    {question}  required: the record's question
    {choices}   the choices as lettered lines "A. c0\\nB. c1\\n..."; with it the scored continuation of choice k is
                " <letter k>" (lm-eval's letter scoring), without it " <choice k>" (cloze scoring)
    {subject}   the record's subject (MCQ records' optional field); a record without one is an error

Presets (`--template NAME`); anything else containing {question} is a custom template:

    cloze-answer  "{question}\\nAnswer:"                      the default: the cloze line the demo model learned
    plain         "{question}"                               the question followed directly by each choice
    wmdp          "The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}\\n"
                  "{choices}\\nAnswer:"                       lm-eval's WMDP task (description + doc_to_text), scored
                                                             on the letters; `wmdp:TOPIC` fixes the topic for every
                                                             record, as lm-eval's wmdp_bio does with `wmdp:biology`
    letter        "{question}\\n{choices}\\nAnswer:"           lm-eval's doc_to_text alone (`--format letter`)

QA records render the template without choices (a template with {choices} needs MCQ records); text records are
scored as they are, with no template.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from mansu.data.records import MCQRecord, QARecord, Record, TextRecord

LETTERS = "ABCDEFGH"
FIELDS = ("question", "choices", "subject")
DEFAULT_TEMPLATE = "cloze-answer"
WMDP_HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"
PRESETS: dict[str, str] = {
    "cloze-answer": "{question}\nAnswer:",
    "plain": "{question}",
    "wmdp": WMDP_HEADER + "{question}\n{choices}\nAnswer:",
    "letter": "{question}\n{choices}\nAnswer:",
}
# The two MCQ scoring formats of `mansu eval --format` / RunSpec.fmt, as templates.
FORMAT_TEMPLATES = {"cloze": "cloze-answer", "letter": "letter"}


@dataclass(frozen=True)
class Template:
    """A parsed template: its name (a preset's, or 'custom') and its format string."""

    name: str
    text: str

    @property
    def lettered(self) -> bool:
        """Scored on letters (the template lists the choices) rather than on the choices' text."""
        return "choices" in _fields(self.text)

    def context(self, question: str, *, choices: tuple[str, ...] | None = None, subject: str | None = None,
                where: str = "record") -> str:
        """The rendered prompt of one record (`choices` None: a QA record)."""
        fields = _fields(self.text)
        if "choices" in fields and choices is None:
            raise ValueError(f"{where}: template {self.name!r} lists choices ({{choices}}) but QA records have none; "
                             f"use {', '.join(p for p in PRESETS if 'choices' not in _fields(PRESETS[p]))} or a "
                             "custom template without {choices}")
        if "subject" in fields and not subject:
            raise ValueError(f"{where}: template {self.name!r} uses {{subject}} but the record has no subject; "
                             "add a 'subject' field, or fix the topic with --template wmdp:TOPIC (e.g. wmdp:biology)")
        return self.text.format(question=question, choices=lettered_choices(choices or ()), subject=subject or "")

    def continuations(self, choices: tuple[str, ...]) -> list[str]:
        """The scored continuation of each choice."""
        if self.lettered:
            return [f" {LETTERS[i]}" for i in range(len(choices))]
        return [f" {c}" for c in choices]

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "text": self.text}


def target_texts(record: Record, template: str | Template | None = None, where: str = "record") -> tuple[str, str]:
    """(context, target) of one record: the text a model reads and the part it is trained and scored on.

        mcq:  (template(question, choices), the correct choice's continuation)
        qa:   (template(question), " <answer>")
        text: ("", text): every token after the first is a target
    """
    tmpl = get_template(template)
    if isinstance(record, MCQRecord):
        context = tmpl.context(record.question, choices=record.choices, subject=record.subject, where=where)
        return context, tmpl.continuations(record.choices)[record.answer]
    if isinstance(record, QARecord):
        return tmpl.context(record.question, where=where), f" {record.answer}"
    if isinstance(record, TextRecord):
        return "", record.text
    raise ValueError(f"unsupported record type {type(record).__name__}; accepted are MCQ, QA and text records")


def lettered_choices(choices: tuple[str, ...]) -> str:
    if len(choices) > len(LETTERS):
        raise ValueError(f"lettered templates support at most {len(LETTERS)} choices, got {len(choices)}")
    return "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))


def _fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def get_template(spec: str | Template | None = None) -> Template:
    """The template named by `spec`: a preset, `wmdp:TOPIC`, or a custom string with {question} (None: default)."""
    if isinstance(spec, Template):
        return spec
    spec = DEFAULT_TEMPLATE if spec is None else spec
    if spec in PRESETS:
        return Template(spec, PRESETS[spec])
    if spec.startswith("wmdp:") and spec[5:].strip():
        topic = spec[5:].strip().replace("{", "{{").replace("}", "}}")
        return Template(spec, PRESETS["wmdp"].replace("{subject}", topic))
    return Template("custom", _check_custom(spec))


def _check_custom(text: str) -> str:
    accepted = f"a preset ({', '.join(PRESETS)}, wmdp:TOPIC) or a string containing {{question}}"
    try:
        fields = _fields(text)
    except ValueError as exc:
        raise ValueError(f"template {text!r}: {exc} (write literal braces as {{{{ and }}}}); "
                         f"accepted are {accepted}") from None
    if "question" not in fields:
        raise ValueError(f"unknown template {text!r}; accepted are {accepted}")
    unknown = sorted(f for f in fields if f not in FIELDS)
    if unknown:
        raise ValueError(f"template {text!r}: unknown field(s) {unknown}; accepted fields are "
                         f"{', '.join('{' + f + '}' for f in FIELDS)}")
    return text


def check_template(spec: str) -> str:
    """`spec` if it names a valid template (ValueError in one line otherwise): for validating settings early."""
    get_template(spec)
    return spec
