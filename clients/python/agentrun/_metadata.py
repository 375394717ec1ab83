"""Metadata models: `BaseMetadata` and `BaseAgentRunMetadata`, as in Docent's seed-era data model.

Subclass either to add fields; give each a `Field(description=...)`: descriptions are rendered next
to the field in `.text`, for the LLM that reads the run.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

_DESCRIPTIONS_KEY = "_field_descriptions"
_INTERNAL_FIELDS = frozenset({"allow_fields_without_descriptions", _DESCRIPTIONS_KEY})


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
    _field_descriptions: dict[str, str | None] = PrivateAttr(default_factory=dict)

    def model_post_init(self, context: Any, /) -> None:
        extra = self.__pydantic_extra__
        received = extra.pop(_DESCRIPTIONS_KEY, None) if extra is not None else None
        descriptions = self._declared_field_descriptions()
        if isinstance(received, dict):
            descriptions.update(received)
        self._field_descriptions = descriptions

    @model_validator(mode="after")
    def _check_descriptions_and_json(self) -> BaseMetadata:
        if not self.allow_fields_without_descriptions:
            for name, description in self._declared_field_descriptions().items():
                if description is None:
                    raise ValueError(
                        f"Field `{name}` of {type(self).__name__} needs a description: add "
                        "Field(description=...), or set `allow_fields_without_descriptions = True`"
                    )
        try:
            self.model_dump_json()
        except Exception as exc:
            raise ValueError(f"Metadata is not JSON serializable: {exc}") from exc
        return self

    @classmethod
    def _declared_field_descriptions(cls) -> dict[str, str | None]:
        return {
            name: field.description
            for name, field in cls.model_fields.items()
            if name not in _INTERNAL_FIELDS
        }

    @model_serializer(mode="wrap")
    def _serialize_with_descriptions(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            data[_DESCRIPTIONS_KEY] = dict(self._field_descriptions)
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
        return self._field_descriptions.get(name)

    def get_all_field_descriptions(self) -> dict[str, str | None]:
        """Return declared field name -> description (None where the field has none)."""
        return dict(self._field_descriptions)

    def _set_field_descriptions(self, descriptions: dict[str, str | None]) -> None:
        self._field_descriptions = {**self._declared_field_descriptions(), **descriptions}


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
