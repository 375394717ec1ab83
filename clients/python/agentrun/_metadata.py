"""Metadata models: `BaseMetadata` and `BaseAgentRunMetadata`, as in Docent's seed-era data model.

Subclass either to add fields; give each a `Field(description=...)`: descriptions are rendered next
to the field in `.text`, for the LLM that reads the run.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

DESCRIPTIONS_KEY = "_field_descriptions"
_OWN_DESCRIPTIONS = "_own_descriptions"
_INTERNAL_FIELDS = frozenset({"allow_fields_without_descriptions", DESCRIPTIONS_KEY})
FROM_WIRE: dict[str, Any] = {}
"""Validation context of metadata decoded from the wire form (`agentrun._convert`)."""


class BaseMetadata(BaseModel):
    """Metadata of a transcript or run: declared fields (in subclasses) plus arbitrary extras.

    Extras are kept (`extra="allow"`). Values MUST be JSON-serializable. Every dump carries the
    declared fields' descriptions under `_field_descriptions`, so they survive a JSON round trip.

    Raises:
        pydantic.ValidationError: a declared field lacks a description while
            `allow_fields_without_descriptions` is False, or a value is not JSON-serializable.
    """

    model_config = ConfigDict(extra="allow")

    allow_fields_without_descriptions: bool = True

    # The declared descriptions with those that came with the data (a dump's
    # `_field_descriptions`) over them are kept as pydantic keeps private attributes, under
    # `_OWN_DESCRIPTIONS`, only when they differ (rare). Not a declared `PrivateAttr`: pydantic
    # initializes those in Python for every object, half of a small run's decode (measured).
    def model_post_init(self, context: Any, /) -> None:
        extra = self.__pydantic_extra__
        if extra and DESCRIPTIONS_KEY in extra:
            received = extra.pop(DESCRIPTIONS_KEY)
            declared = _declared_descriptions(type(self))
            if isinstance(received, dict) and (merged := {**declared, **received}) != declared:
                private = self.__pydantic_private__  # a subclass's own private attributes, if any
                if private is None:
                    object.__setattr__(self, "__pydantic_private__", {_OWN_DESCRIPTIONS: merged})
                else:
                    private[_OWN_DESCRIPTIONS] = merged

    def _descriptions(self) -> dict[str, str | None]:
        private = self.__pydantic_private__
        own = private.get(_OWN_DESCRIPTIONS) if private else None
        return own or _declared_descriptions(type(self))

    @model_validator(mode="after")
    def _check_descriptions_and_json(self, info: ValidationInfo) -> BaseMetadata:
        if not self.allow_fields_without_descriptions:
            for name, description in _declared_descriptions(type(self)).items():
                if description is None:
                    raise ValueError(
                        f"Field `{name}` of {type(self).__name__} needs a description: add "
                        "Field(description=...), or set `allow_fields_without_descriptions = True`"
                    )
        if info.context is FROM_WIRE:
            return self  # decoded values are JSON-like by construction: no dump to prove it
        try:
            self.model_dump_json()
        except Exception as exc:
            raise ValueError(f"Metadata is not JSON serializable: {exc}") from exc
        return self

    @model_serializer(mode="wrap")
    def _serialize_with_descriptions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            data[DESCRIPTIONS_KEY] = dict(self._descriptions())
        return data

    def model_dump(
        self, *args: Any, strip_internal_fields: bool = False, **kwargs: Any
    ) -> dict[str, Any]:
        """Dump to a dict; `strip_internal_fields=True` drops the description bookkeeping keys."""
        data = super().model_dump(*args, **kwargs)
        if strip_internal_fields:
            for key in _INTERNAL_FIELDS:
                data.pop(key, None)
        return data

    def get(self, key: str, default_value: Any = None) -> Any:
        """Return a declared or extra field's value (even None), or `default_value` if absent."""
        if key in type(self).model_fields:
            return getattr(self, key)
        extra = self.__pydantic_extra__ or {}
        return extra.get(key, default_value)

    def get_field_description(self, name: str) -> str | None:
        """Return a declared field's description, or None (extras have none)."""
        return self._descriptions().get(name)

    def get_all_field_descriptions(self) -> dict[str, str | None]:
        """Return declared field name -> description (None where the field has none)."""
        return dict(self._descriptions())


@functools.cache
def _declared_descriptions(model: type[BaseMetadata]) -> dict[str, str | None]:
    # Once per class: a run's decode builds a metadata object per transcript.
    return {
        name: field.description
        for name, field in model.model_fields.items()
        if name not in _INTERNAL_FIELDS
    }


SCORES_DESCRIPTION = (
    "A dict of score_key -> score_value. Use one key for each metric you're tracking."
)


class BaseAgentRunMetadata(BaseMetadata):
    """Metadata of an `AgentRun`: `scores` is required; subclass to declare more fields.

    Score values are bool, int (64-bit), float or None; strings coerce where pydantic can
    ("1" -> 1).
    """

    SCORES_DESCRIPTION: ClassVar[str] = SCORES_DESCRIPTION

    scores: dict[str, int | float | bool | None] = Field(description=SCORES_DESCRIPTION)

    @field_validator("scores")
    @classmethod
    def _scores_fit_the_wire(
        cls, scores: dict[str, int | float | bool | None]
    ) -> dict[str, int | float | bool | None]:
        for name, value in scores.items():
            if type(value) is int and not -(2**63) <= value < 2**63:
                raise ValueError(f"score {name!r}: integer scores must fit in 64 bits, got {value}")
        return scores
