"""Globs over store keys: what a source's `uri` names, and whether it could name a given folder's objects.

A glob is '/'-separated, by POSIX glob and pathlib rules: `*`, `?` and `[...]` match within one
path segment, never across '/'; `**` as a whole segment matches any number of folders (a last
`**` also the file); a segment starting with '.' (a hidden file or folder) matches only where
the pattern's segment starts with '.'.
"""

from __future__ import annotations

import re
from functools import lru_cache

from storage.store import open_store

GLOB_CHARS = re.compile(r"[*?\[]")


def split_glob(uri: str) -> tuple[str, str]:
    """The folder before the first glob character and the pattern after it:
    s3://b/raw/**/*.jsonl -> (s3://b/raw, **/*.jsonl); a URI without one -> (its folder, its name)."""
    static, slash, _ = GLOB_CHARS.split(uri, 1)[0].rpartition("/")
    if slash and not static:
        return "/", uri[1:]  # a glob at the root of the file system
    return static, uri[len(static) + 1 :] if static else uri


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A glob (relative to its folder) as a regex over keys."""
    segments = pattern.split("/")
    regex = []
    for position, segment in enumerate(segments):
        last = position == len(segments) - 1
        if segment == "**":
            regex.append(r"(?:(?!\.)[^/]+/)*" + (r"(?!\.)[^/]+" if last else ""))
            continue
        regex.append(("" if segment.startswith(".") else r"(?!\.)") + _segment_regex(segment) + ("" if last else "/"))
    return re.compile("".join(regex))


def _segment_regex(segment: str) -> str:
    out, i = [], 0
    while i < len(segment):
        char = segment[i]
        i += 1
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[" and (end := segment.find("]", i + 1 + (segment[i : i + 1] == "!"))) != -1:
            # a class: '!' first negates it, a ']' right after '[' or '[!' is a member
            body, i = segment[i:end], end + 1
            negate = body.startswith("!")
            body = re.sub(r"([\\^\[])", r"\\\1", body[1:] if negate else body)
            out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
        else:
            out.append(re.escape(char))
    return "".join(out)


def _segments(store_uri: str) -> tuple[str, ...]:
    return tuple(store_uri.removesuffix("/").split("/"))


def could_match_below(uri: str, folder_uri: str, depth: int = 1) -> bool:
    """Whether the glob `uri` could match a key `depth` or more segments below the folder
    `folder_uri`, whatever the store holds (the segments below it may have any names). Both are
    compared as the stores they open: local paths absolute, symlinks resolved."""
    static, pattern = split_glob(uri)
    root, folder = _segments(open_store(static or ".").uri), _segments(open_store(folder_uri).uri)
    segments = tuple(pattern.split("/"))
    if root[: len(folder)] == folder:  # the glob's folder lies inside `folder`
        return _long_enough(segments, depth - (len(root) - len(folder)))
    if folder[: len(root)] != root:
        return False  # neither holds the other
    return _reaches_below(segments, folder[len(root) :], depth)


def _long_enough(pattern: tuple[str, ...], depth: int) -> bool:
    """Whether the pattern could match a key of `depth` or more segments of any names."""
    return "**" in pattern or len(pattern) >= depth


@lru_cache(maxsize=1024)
def _reaches_below(pattern: tuple[str, ...], folder: tuple[str, ...], depth: int) -> bool:
    """Whether the pattern could match `folder`'s segments followed by `depth` or more others."""
    if not folder:
        return _long_enough(pattern, depth)
    if not pattern:
        return False
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        if not rest:  # a last `**` matches one or more non-hidden segments
            return not any(segment.startswith(".") for segment in folder)
        # `**` matches no more segments, or one more (a non-hidden one) and maybe others after it
        return _reaches_below(rest, folder, depth) or (
            not folder[0].startswith(".") and _reaches_below(pattern, folder[1:], depth)
        )
    return glob_regex(head).fullmatch(folder[0]) is not None and _reaches_below(rest, folder[1:], depth)
