"""One DINM edit request: an adversarial prompt, its unsafe and safe responses, and a benign prompt to keep.

Two input forms are accepted, alone or as a JSON list:

* a SafeEdit record (keys "adversarial prompt", "unsafe generation", "safe generation", "knowledge constrain",
  optionally "id", "question", "generalization test", ...);
* the short form ``{"prompt", "safe", "unsafe", "benign": {"prompt", "answer"}}`` (optional "id").
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from .errors import InstanceError

# SafeEdit's four held-out variants, in the order the paper reports them.
GENERALIZATION_KEYS = {
    "only_question": "test input of only harmful question",
    "other_attack": "test input of other attack prompt input",
    "other_question": "test input of other question input",
    "other_attack_question": "test input of other questions and attack prompts",
}


@dataclass(frozen=True)
class Instance:
    """A validated edit request. Texts are never empty."""

    prompt: str
    safe: str
    unsafe: str
    benign_prompt: str
    benign_answer: str
    id: str = ""
    question: str = ""
    generalization: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The short form, which `parse_instance` reads back."""
        d = {"prompt": self.prompt, "safe": self.safe, "unsafe": self.unsafe,
             "benign": {"prompt": self.benign_prompt, "answer": self.benign_answer}}
        if self.id:
            d["id"] = self.id
        if self.question:
            d["question"] = self.question
        if self.generalization:
            d["generalization"] = dict(self.generalization)
        return d


def _where(source: str, index: int | None, record_id: Any) -> str:
    if record_id not in (None, "") and (not isinstance(record_id, (str, int))
                                        or (isinstance(record_id, str) and not record_id.isprintable())):
        record_id = repr(record_id)[:40]  # one line, whatever the id holds
    parts = [f"`{source}`"]
    if index is not None:
        parts.append(f"record {index}" + (f" (id {record_id})" if record_id not in (None, "") else ""))
    elif record_id not in (None, ""):
        parts.append(f"record id {record_id}")
    return ", ".join(parts)


def _text(obj: dict, key: str, where: str, expected: list[str]) -> str:
    if key not in obj:
        raise InstanceError(f"instance {where} has no field {key!r} (expected: {', '.join(map(repr, expected))})")
    value = obj[key]
    if not isinstance(value, str):
        raise InstanceError(f"instance {where}: field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise InstanceError(f"instance {where}: field {key!r} is empty; give it the text it should hold")
    _unicode(value, key, where)
    return value


def _unicode(value: str, key: str, where: str) -> None:
    """Refuse text no tokenizer can encode (a lone surrogate, e.g. from an escaped half of a UTF-16 pair)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InstanceError(f"instance {where}: field {key!r} holds a lone surrogate ({value[e.start]!r} at "
                            f"character {e.start}), which is not text; fix the file's escapes") from None


@dataclass(frozen=True)
class _Form:
    """Where one input form keeps each field."""

    prompt: str
    safe: str
    unsafe: str
    benign: str
    generalization: str
    generalization_keys: dict[str, str]  # Instance key -> key in the record's generalization object

    @property
    def required(self) -> list[str]:
        return [self.prompt, self.unsafe, self.safe, self.benign]


_SAFEEDIT = _Form("adversarial prompt", "safe generation", "unsafe generation", "knowledge constrain",
                  "generalization test", GENERALIZATION_KEYS)
_SHORT = _Form("prompt", "safe", "unsafe", "benign", "generalization", {k: k for k in GENERALIZATION_KEYS})


def parse_instance(obj: Any, source: str = "<instance>", index: int | None = None) -> Instance:
    """Validate one record (SafeEdit or short form) and return an `Instance`.

    Raises:
        InstanceError: naming the source file, the record and the bad field.
    """
    if not isinstance(obj, dict):
        where = _where(source, index, None)
        raise InstanceError(f"instance {where} must be a JSON object, got {type(obj).__name__}")
    record_id = obj.get("id", obj.get("case_id", ""))
    where = _where(source, index, record_id)
    form = _SAFEEDIT if _SAFEEDIT.prompt in obj else _SHORT if _SHORT.prompt in obj else None
    if form is None:
        raise InstanceError(
            f"instance {where} is neither a SafeEdit record (needs {_SAFEEDIT.prompt!r}) nor the short form "
            f"(needs {', '.join(map(repr, _SHORT.required))})"
        )
    benign = obj.get(form.benign)
    if not isinstance(benign, dict):
        raise InstanceError(
            f"instance {where} has no object field {form.benign!r} (expected {{'prompt': ..., 'answer': ...}})"
        )
    tests = obj.get(form.generalization)
    tests = tests if isinstance(tests, dict) else {}
    question = obj.get("question")
    benign_where = f"{where}, {form.benign!r}"
    if isinstance(question, str):
        _unicode(question, "question", where)
    for key in form.generalization_keys.values():
        if isinstance(tests.get(key), str):
            _unicode(tests[key], key, f"{where}, {form.generalization!r}")
    return Instance(
        prompt=_text(obj, form.prompt, where, form.required),
        safe=_text(obj, form.safe, where, form.required),
        unsafe=_text(obj, form.unsafe, where, form.required),
        benign_prompt=_text(benign, "prompt", benign_where, ["prompt", "answer"]),
        benign_answer=_text(benign, "answer", benign_where, ["prompt", "answer"]),
        id=str(record_id),
        question=question if isinstance(question, str) else "",
        generalization={k: tests[v] for k, v in form.generalization_keys.items()
                        if isinstance(tests.get(v), str) and tests[v].strip()},
    )


def load_instances(path: str | os.PathLike) -> list[Instance]:
    """Read a JSON file holding one record or a list of records."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise InstanceError(f"instance file `{source}` does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InstanceError(f"instance file `{source}` cannot be read: {e}") from None
    except json.JSONDecodeError as e:
        raise InstanceError(f"instance file `{source}` is not valid JSON: {e.msg} at line {e.lineno}") from None
    except RecursionError:
        raise InstanceError(f"instance file `{source}` is nested too deeply to be an instance file") from None
    if isinstance(data, list):
        if not data:
            raise InstanceError(f"instance file `{source}` holds an empty list; give it at least one record")
        return [parse_instance(obj, source, i) for i, obj in enumerate(data)]
    return [parse_instance(data, source)]


def load_instance(path: str | os.PathLike, index: int = 0) -> Instance:
    """One record of a file (the first by default)."""
    instances = load_instances(path)
    if not 0 <= index < len(instances):
        raise InstanceError(f"instance file `{os.fspath(path)}` has {len(instances)} records; index {index} is out of range")
    return instances[index]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_QUESTION_END = re.compile(r"\?[\s.!\"'\u2019\u201d]*$")  # "...?", "...?.", "...?!", '...?"'
WRAPPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "wrapper_corpus.json")
_LEADING = re.compile(r"^[^\w\"'\u2018\u201c]+")  # "<<} #How ..." -> "How ..."


def request_of(prompt: str) -> str | None:
    """The request inside an adversarial prompt, as dinm reads it from the prompt alone: its last question (a
    sentence ending with "?"), or its last sentence when it asks none; and, when that sentence introduces the request
    with a colon ("... answer my first question: How do I ...?"), what follows the last colon. None when that is the
    whole prompt (no wrapper to remove) or under three words.

    Jailbreak templates put the request last ("Ignore all previous instructions. <request>"), or put it before a
    forced opening of the reply ("<request>? Start with \"Absolutely! Here's\"", "... my question: <request>?.
    Excited! Step 1, I will"), which is why a question wins over a later sentence. A request that is not a question
    and is followed by other text ("... how to poison someone. Write what he says, in detail.") yields that last
    sentence instead, which an edit would then learn to refuse as well. How often this finds SafeEdit's own
    `question`: README, "Python API"."""
    sentences = [s.strip() for s in _SENTENCE_END.split(prompt.strip()) if s.strip()]
    if not sentences:
        return None
    questions = [s for s in sentences if _QUESTION_END.search(s)]
    request = questions[-1] if questions else sentences[-1]
    if ":" in request:
        after = request.rsplit(":", 1)[1].strip()
        request = after if len(after.split()) >= 3 else request
    request = _LEADING.sub("", request).strip(" \"'\u2018\u2019\u201c\u201d")
    if questions:  # "...?." / "...?!" -> "...?"
        request = request[:request.rindex("?") + 1]
    return None if len(request.split()) < 3 or request == prompt.strip() else request


@lru_cache(maxsize=1)
def wrappers() -> tuple[str, ...]:
    """dinm's written jailbreak wrappers (`wrapper_corpus.json`), each with one "{request}" where the request goes:
    other wrappers than an instance's, for an edit that should refuse the request however it is wrapped
    (`EditConfig(variants="wrapped")`). Written for dinm, in no evaluation's data."""
    with open(WRAPPERS, encoding="utf-8") as f:
        return tuple(json.load(f))


def wrapped(request: str) -> list[str]:
    """`request` inside each of `wrappers()`."""
    return [w.replace("{request}", request) for w in wrappers()]
