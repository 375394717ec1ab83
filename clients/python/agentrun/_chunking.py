"""`AgentRun.to_text(token_limit)`: the rendered run cut into chunks that each fit a token budget.

Every chunk is at most `token_limit` cl100k_base tokens (see `agentrun._tokens`). The run is cut
along transcript boundaries first, then between units of action, then inside a unit too long for a
chunk. Where this differs from Docent's seed-era splitting (research/docent.md, 2.6), and why:

- Nothing is dropped. A unit longer than a chunk is cut into numbered parts, `<action unit 3 part
  1/2>` ... `</action unit 3 part 1/2>`, carried by consecutive chunks; joining the parts' bodies
  gives the unit back. Docent truncates such a unit and loses its tail and closing tags.
- Every block keeps its own transcript's index (`T2B5`); Docent restarts at `T0` in split chunks.
- The run's metadata is separated from the transcripts by a blank line, as in `.text`.
- Special-token strings (`<|endoftext|>`) are counted as text; Docent raises ValueError.
- The run's metadata rides along in every chunk when it is small (a quarter of the limit or less);
  otherwise it is packed once, after the transcripts, cut into parts if it must be. A transcript's
  metadata follows its last unit, like in `.text`.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentrun._tokens import count_tokens, split_by_tokens
from agentrun._transcript import action_unit

if TYPE_CHECKING:
    from agentrun._agent_run import AgentRun

PARTIAL_HEADER = "Here is a partial agent run for analysis purposes only:\n"
RUN_METADATA_HEADER = "Metadata about the complete agent run:\n"

# The smallest limit accepted: headers and tags must leave room for content.
MIN_TOKEN_LIMIT = 128

# Tokens kept spare in every chunk: pieces counted alone can gain a token or two when joined.
_SLACK = 8

_RUN = -1  # section of the run's metadata; transcripts are sections 0, 1, ...


@dataclass(frozen=True, slots=True)
class _Atom:
    """The smallest thing a chunk holds: a unit, a metadata block, or a part of one."""

    section: int
    is_metadata: bool
    text: str
    tokens: int


def split_run_text(run: AgentRun, token_limit: int) -> list[str]:
    """Implement `AgentRun.to_text`: see the module docstring.

    Raises:
        ValueError: `token_limit` is below `MIN_TOKEN_LIMIT`, or too small to hold the run's
            chunk headers with room to spare.
    """
    if token_limit == sys.maxsize:
        return [run.text]
    if token_limit < MIN_TOKEN_LIMIT:
        raise ValueError(
            f"token_limit must be at least {MIN_TOKEN_LIMIT} tokens, got {token_limit}"
        )
    rendered = _Rendered.of(run)  # once: the whole text and the chunks are made of the same pieces
    text = rendered.text()
    if count_tokens(text) <= token_limit:
        return [text]
    return _Packer(rendered, token_limit).chunks()


def render_text(run: AgentRun) -> str:
    """Implement `AgentRun.text`."""
    return _Rendered.of(run).text()


@dataclass(frozen=True, slots=True)
class _Rendered:
    """The run's text in pieces, each rendered once (rendering, mostly YAML, is the cost)."""

    keys: list[str]
    units: list[list[str]]
    """Per transcript, each unit of action's blocks joined (the body of `<action unit k>`)."""
    metadata: list[str]
    """Per transcript, its `<metadata>` block."""
    run_metadata: str
    """The run's `<agent run metadata>` block."""

    @classmethod
    def of(cls, run: AgentRun) -> _Rendered:
        transcripts = list(run.transcripts.values())
        return cls(
            list(run.transcripts),
            [
                ["\n".join(blocks) for blocks in t.unit_blocks(transcript_idx=i)]
                for i, t in enumerate(transcripts)
            ],
            [t.metadata_block() for t in transcripts],
            run.metadata_block(),
        )

    def text(self) -> str:
        """`AgentRun.text`: each transcript as `Transcript.to_str` renders it, then the run's
        metadata (tests hold this equal to Docent's formula on every real run)."""
        transcripts = "\n\n".join(
            f"<transcript {key}>\n<blocks>\n"
            + "\n".join(action_unit(k, body) for k, body in enumerate(units))
            + f"\n</blocks>\n{metadata}\n</transcript {key}>"
            for key, units, metadata in zip(self.keys, self.units, self.metadata, strict=True)
        )
        return (
            "Here is a complete agent run for analysis purposes only:\n"
            f"{transcripts}\n\n{RUN_METADATA_HEADER}{self.run_metadata}"
        )


class _Packer:
    def __init__(self, rendered: _Rendered, token_limit: int) -> None:
        self.rendered = rendered
        self.limit = token_limit
        self.keys = rendered.keys
        run_metadata = RUN_METADATA_HEADER + rendered.run_metadata
        # Small run metadata is repeated in every chunk: each chunk is often read on its own.
        self.repeated = run_metadata if count_tokens(run_metadata) <= token_limit // 4 else None
        self.fixed_tokens = count_tokens(PARTIAL_HEADER) + (
            count_tokens(self.repeated) + 1 if self.repeated else 0
        )
        self.section_tokens = {
            i: count_tokens(f"<transcript {key}>\n<blocks>\n\n</blocks>\n\n</transcript {key}>") + 1
            for i, key in enumerate(self.keys)
        }
        self.section_tokens[_RUN] = count_tokens(RUN_METADATA_HEADER) + 1
        self.piece_budget = (
            token_limit - self.fixed_tokens - max(self.section_tokens.values()) - _SLACK
        )
        if self.piece_budget < 48:
            raise ValueError(
                f"token_limit {token_limit} is too small for this run: its chunk headers and "
                f"metadata take {token_limit - self.piece_budget} tokens"
            )

    def chunks(self) -> list[str]:
        queue = deque(self._atoms())
        chunks: list[str] = []
        current: list[_Atom] = []
        estimate = self.fixed_tokens
        while True:
            if queue:
                atom = queue[0]
                cost = atom.tokens + 1
                if not current or current[-1].section != atom.section:
                    cost += self.section_tokens[atom.section]
                if not current or estimate + cost <= self.limit - _SLACK:
                    current.append(queue.popleft())
                    estimate += cost
                    continue
            if not current:
                return chunks
            chunks.append(self._close(current, queue))
            current, estimate = [], self.fixed_tokens

    def _close(self, atoms: list[_Atom], queue: deque[_Atom]) -> str:
        """Render a chunk, handing atoms back to the queue while the exact count is over."""
        text = self._render(atoms)
        while count_tokens(text) > self.limit:
            if len(atoms) == 1:
                raise RuntimeError(  # the budgets above make this unreachable; never truncate
                    f"agentrun bug: a {atoms[0].tokens}-token piece does not fit a "
                    f"{self.limit}-token chunk"
                )
            queue.appendleft(atoms.pop())
            text = self._render(atoms)
        return text

    def _render(self, atoms: list[_Atom]) -> str:
        sections: list[str] = []
        start = 0
        for end in range(1, len(atoms) + 1):
            if end == len(atoms) or atoms[end].section != atoms[start].section:
                sections.append(self._render_section(atoms[start:end]))
                start = end
        if self.repeated:
            sections.append(self.repeated)
        return PARTIAL_HEADER + "\n\n".join(sections)

    def _render_section(self, atoms: list[_Atom]) -> str:
        section = atoms[0].section
        if section == _RUN:
            return RUN_METADATA_HEADER + "\n".join(a.text for a in atoms)
        key = self.keys[section]
        units = [a.text for a in atoms if not a.is_metadata]
        inner = ["<blocks>\n" + "\n".join(units) + "\n</blocks>"] if units else []
        inner.extend(a.text for a in atoms if a.is_metadata)
        return f"<transcript {key}>\n" + "\n".join(inner) + f"\n</transcript {key}>"

    def _atoms(self) -> Iterator[_Atom]:
        rendered = self.rendered
        for i, (units, metadata) in enumerate(zip(rendered.units, rendered.metadata, strict=True)):
            for k, body in enumerate(units):
                yield from self._whole_or_parts(
                    i, False, f"action unit {k}", action_unit(k, body), body
                )
            yield from self._whole_or_parts(i, True, "metadata", metadata, _tag_body(metadata))
        if not self.repeated:
            metadata = rendered.run_metadata
            yield from self._whole_or_parts(
                _RUN, True, "agent run metadata", metadata, _tag_body(metadata)
            )

    def _whole_or_parts(
        self, section: int, is_metadata: bool, label: str, whole: str, body: str
    ) -> Iterator[_Atom]:
        tokens = count_tokens(whole)
        if tokens <= self.piece_budget:
            yield _Atom(section, is_metadata, whole, tokens)
            return
        tags = count_tokens(f"<{label} part 9999/9999>\n\n</{label} part 9999/9999>")
        pieces = split_by_tokens(body, self.piece_budget - tags)
        for j, piece in enumerate(pieces, start=1):
            tag = f"{label} part {j}/{len(pieces)}"
            text = f"<{tag}>\n{piece}\n</{tag}>"
            yield _Atom(section, is_metadata, text, count_tokens(text))


def _tag_body(block: str) -> str:
    """The body of a `<tag>\\n...\\n</tag>` block."""
    return block[block.index("\n") + 1 : block.rindex("\n")]
