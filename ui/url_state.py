"""A page's view state in the URL: widget values mirrored into st.query_params, so a deep link (shared with a
reviewer, or reloaded) reopens the same view.

Each page lists its fields once (URL name, widget key, parser); `restore` runs before the widgets are drawn and
applies a URL value only when the link is new (a value already applied or written by this session does not
override what the user changed since), `publish` runs after them and writes the current values back.  A value
that does not parse is ignored; the widget then validates what remains (an unknown stage or node falls back to
its default as the page decides).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import streamlit as st


@dataclass(frozen=True)
class UrlField:
    param: str                                   # name in the URL (?stage=after_fp)
    key: str                                     # the widget's session_state key
    parse: Callable[[str], Any] = str            # URL text -> widget value (ValueError: ignored)
    show: Callable[[Any], str | None] = str      # widget value -> URL text (None: leave it out of the URL)


def _seen_key(field: UrlField) -> str:
    return f"_url_seen_{field.param}"


def restore(fields: Sequence[UrlField]) -> None:
    """Set each widget's state from the URL where the URL's value is new (call before drawing the widgets)."""
    for field in fields:
        text = st.query_params.get(field.param)
        if text is None or text == st.session_state.get(_seen_key(field)):
            continue
        st.session_state[_seen_key(field)] = text
        try:
            st.session_state[field.key] = field.parse(text)
        except ValueError:
            continue


def publish(fields: Sequence[UrlField], *, drop: Sequence[UrlField] = ()) -> None:
    """Write the widgets' current values into the URL (a value shown as None is removed from it), and remove the
    parameters of `drop` (another view's fields) that `fields` does not name."""
    for field in drop:
        if field.param not in {f.param for f in fields}:
            st.query_params.pop(field.param, None)
    for field in fields:
        value = st.session_state.get(field.key)
        text = None if value is None else field.show(value)
        if text is None:
            st.query_params.pop(field.param, None)
        elif st.query_params.get(field.param) != text:
            st.query_params[field.param] = text
        st.session_state[_seen_key(field)] = text


def choice(options: Sequence[str]) -> Callable[[str], str]:
    """A parser accepting only one of `options`."""
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"{text!r} is not one of {', '.join(options)}")
        return text
    return parse


def number(low: float, high: float, kind: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """A parser accepting a number in [low, high] (a slider raises on a value outside its range)."""
    def parse(text: str) -> Any:
        value = kind(text)
        if not low <= value <= high:
            raise ValueError(f"{text!r} is outside [{low}, {high}]")
        return value
    return parse
