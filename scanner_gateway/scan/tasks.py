"""Task templates are data: `prompts/<name>.yaml`, loaded and checked once at startup.

`TaskRegistry.load(dir)` refuses to start on the first bad file, naming it and the
problem: YAML errors, unknown fields, an invalid or unbounded result schema, a schema
whose longest answer does not fit in max_tokens, a template that does not render, or
a schema whose answer does not fit the task's typed result model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any, Literal

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from scanner_gateway.errors import InvalidRequest, UnknownTask, echo
from scanner_gateway.scan import schema as schema_checks
from scanner_gateway.scan.images import PixelBudget as ImageBudget
from scanner_gateway.scan.images import Scale
from scanner_gateway.scan.postprocess import OutputInvalid, build_result
from scanner_gateway.scan.results import RESULT_MODELS

Locale = Literal["zh", "en"]
LOCALES: tuple[Locale, ...] = ("zh", "en")
TEMPLATE_VARIABLES = ("image_count",)
TILE_AREA = 32 * 32
IMAGE_INDEX_KEY = "image"  # per-item photo index in multi-photo tasks


def parse_locale(value: Any) -> Locale | None:
    """A request's optional locale; None or "" means the gateway's default."""
    if value in (None, ""):
        return None
    if value not in LOCALES:
        raise InvalidRequest(
            f"locale must be one of {', '.join(LOCALES)}; got {echo(value)}", param="locale"
        )
    return value


class TaskConfigError(RuntimeError):
    """A task file is invalid; the message names the file."""


class PixelBudgetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_pixels: int = Field(ge=4 * TILE_AREA, le=16384 * TILE_AREA)
    min_pixels: int = Field(4 * TILE_AREA, ge=TILE_AREA)

    @model_validator(mode="after")
    def _ordered(self) -> PixelBudgetSpec:
        if self.min_pixels > self.max_pixels:
            raise ValueError("min_pixels exceeds max_pixels")
        return self


class SamplingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(ge=16, le=32768)


class TaskSpec(BaseModel):
    """One task file, as written."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,47}$")
    version: str | int
    description: str = Field(min_length=1)
    max_images: int = Field(ge=1, le=16)
    pixel_budget: PixelBudgetSpec
    sampling: SamplingSpec
    system: dict[Locale, str]
    user: dict[Locale, str]
    result_schema: dict[str, Any]

    @model_validator(mode="after")
    def _all_locales(self) -> TaskSpec:
        for part in ("system", "user"):
            missing = set(LOCALES) - set(getattr(self, part))
            if missing:
                raise ValueError(f"{part} is missing locale(s) {sorted(missing)}")
        return self


@dataclass(frozen=True)
class Task:
    """A loaded, checked task, ready to render."""

    spec: TaskSpec
    path: Path
    validator: Draft202012Validator
    result_model: type[BaseModel] | None
    max_answer_chars: int
    _schemas: dict[int, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def budget(self) -> ImageBudget:
        return ImageBudget(self.spec.pixel_budget.max_pixels, self.spec.pixel_budget.min_pixels)

    def engine_schema(self, image_count: int) -> dict[str, Any]:
        """The result schema with every `image` index capped to the photos actually sent,
        so constrained decoding cannot point a box at a photo that does not exist."""
        cached = self._schemas.get(image_count)
        if cached is None:
            cached = _cap_image_index(self.spec.result_schema, image_count - 1)
            self._schemas[image_count] = cached
        return cached

    def render(self, locale: Locale, image_count: int) -> tuple[str, str]:
        """(system, user) texts for `locale`; raises KeyError/ValueError on bad templates."""
        values = {"image_count": image_count}
        return (
            Template(self.spec.system[locale]).substitute(values),
            Template(self.spec.user[locale]).substitute(values),
        )

    def public(self) -> dict[str, Any]:
        s = self.spec
        return {
            "name": s.name,
            "model_id": f"scan/{s.name}",
            "version": str(s.version),
            "description": s.description,
            "max_images": s.max_images,
            "pixel_budget": s.pixel_budget.model_dump(),
            "sampling": s.sampling.model_dump(),
            "locales": list(LOCALES),
            "engine_schema": s.result_schema,
            "result_schema": (
                self.result_model.model_json_schema(mode="serialization")
                if self.result_model
                else None
            ),
        }


def _cap_image_index(node: Any, last: int) -> Any:
    if isinstance(node, list):
        return [_cap_image_index(v, last) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _cap_image_index(v, last) for k, v in node.items()}
    image = out.get("properties", {}).get(IMAGE_INDEX_KEY)
    if isinstance(image, dict) and image.get("type") == "integer":
        out["properties"][IMAGE_INDEX_KEY] = {**image, "maximum": min(image.get("maximum", last), last)}
    return out


def load_task(path: Path) -> Task:
    def fail(msg: str) -> TaskConfigError:
        return TaskConfigError(f"{path}: {msg}")

    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise fail(f"cannot read YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise fail("top level must be a mapping")
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise fail(f"{where}: {first['msg']}") from exc
    if spec.name != path.stem:
        raise fail(f"name {spec.name!r} must match the file name {path.stem!r}")
    try:
        Draft202012Validator.check_schema(spec.result_schema)
    except SchemaError as exc:
        raise fail(f"result_schema is not valid JSON Schema: {exc.message}") from exc
    if spec.result_schema.get("type") != "object":
        raise fail("result_schema must describe an object")
    problems = schema_checks.bound_problems(spec.result_schema)
    if problems:
        raise fail("result_schema is not bounded: " + "; ".join(problems[:5]))
    longest = schema_checks.max_json_length(spec.result_schema)
    if longest > spec.sampling.max_tokens:
        raise fail(
            f"the longest answer the schema admits is {longest} characters, more than "
            f"sampling.max_tokens={spec.sampling.max_tokens}; lower maxItems/maxLength "
            "or raise max_tokens"
        )
    task = Task(
        spec=spec,
        path=path,
        validator=Draft202012Validator(spec.result_schema),
        result_model=RESULT_MODELS.get(spec.name),
        max_answer_chars=longest,
    )
    for locale in LOCALES:
        try:
            task.render(locale, spec.max_images)
        except (KeyError, ValueError) as exc:
            raise fail(
                f"template for locale {locale!r} does not render ({exc!r}); "
                f"available variables: {', '.join('$' + v for v in TEMPLATE_VARIABLES)}"
            ) from exc
    sample = schema_checks.sample_instance(spec.result_schema)
    scales = [Scale(1000, 1000, 1024, 1024)] * spec.max_images
    try:
        build_result(sample, scales, task.result_model)
    except OutputInvalid as exc:
        raise fail(f"an answer valid for result_schema does not fit the typed model: {exc}") from exc
    return task


class TaskRegistry:
    def __init__(self, tasks: dict[str, Task]) -> None:
        self._tasks = dict(sorted(tasks.items()))
        self.loaded_at = int(time.time())  # the scan pseudo-models' `created`

    @classmethod
    def load(cls, directory: Path) -> TaskRegistry:
        directory = Path(directory)
        if not directory.is_dir():
            raise TaskConfigError(f"{directory}: prompts directory not found (SCANNER_PROMPTS_DIR)")
        files = sorted(directory.glob("*.yaml")) + sorted(directory.glob("*.yml"))
        if not files:
            raise TaskConfigError(f"{directory}: no task files (*.yaml)")
        tasks = {}
        for path in files:
            task = load_task(path)
            if task.name in tasks:
                raise TaskConfigError(f"{path}: duplicate task name {task.name!r}")
            tasks[task.name] = task
        return cls(tasks)

    def get(self, name: str) -> Task:
        try:
            return self._tasks[name]
        except KeyError:
            raise UnknownTask(
                f"unknown task {echo(name)}; available: {', '.join(self._tasks)}", param="task"
            ) from None

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)

    def names(self) -> list[str]:
        return list(self._tasks)

    def most_images(self) -> int:
        """The most photos any task takes in one request."""
        return max(task.spec.max_images for task in self)
