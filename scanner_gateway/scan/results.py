"""Typed scan results: one Pydantic model per built-in task, plus the ScanResult envelope.

The engine answers in the shape of the task file's `result_schema` (boxes as `bbox_2d`
in Qwen3-VL's 0-1000 space); post-processing turns each `bbox_2d` into a `box` in the
original upload's pixels and validates into these models. Summaries are computed here,
from the validated data, so they can never disagree with it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field


class PixelBox(BaseModel):
    """Axis-aligned box in pixels of the original upload (after EXIF rotation)."""

    x1: int
    y1: int
    x2: int
    y2: int


class _Located(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: int = Field(0, ge=0, description="0-based index of the photo the box is in.")
    box: PixelBox | None = Field(None, description="None when the model's box was degenerate.")


Severity = Literal["low", "medium", "high"]


# --- product_scan ---------------------------------------------------------------------
class Product(_Located):
    name: str
    brand: str | None
    category: str
    package: str
    facings: int
    price: float | None
    currency: str | None


class ProductScan(BaseModel):
    products: list[Product]

    @computed_field
    def total_products(self) -> int:
        return len(self.products)

    @computed_field
    def total_facings(self) -> int:
        return sum(p.facings for p in self.products)

    @computed_field
    def priced_products(self) -> int:
        return sum(1 for p in self.products if p.price is not None)


# --- shelf_audit ----------------------------------------------------------------------
class ShelfGap(_Located):
    description: str
    severity: Severity


class MisplacedItem(_Located):
    product: str
    reason: str


class ShelfAudit(BaseModel):
    fullness_pct: int
    gaps: list[ShelfGap]
    misplaced: list[MisplacedItem]
    note: str

    @computed_field
    def gap_count(self) -> int:
        return len(self.gaps)

    @computed_field
    def misplaced_count(self) -> int:
        return len(self.misplaced)


# --- price_tags -----------------------------------------------------------------------
class PriceTag(_Located):
    product_text: str
    price: float | None
    currency: str | None
    unit_price: float | None
    unit: str | None
    promotion: str | None


class PriceTags(BaseModel):
    tags: list[PriceTag]

    @computed_field
    def tag_count(self) -> int:
        return len(self.tags)

    @computed_field
    def promotion_count(self) -> int:
        return sum(1 for t in self.tags if t.promotion)


# --- storefront -----------------------------------------------------------------------
class StorefrontIssue(_Located):
    description: str
    severity: Severity


class Storefront(BaseModel):
    shop_name: str | None
    signage_text: list[str]
    status: Literal["open", "closed", "unknown"]
    licence_visible: bool
    issues: list[StorefrontIssue]

    @computed_field
    def issue_count(self) -> int:
        return len(self.issues)


# --- kitchen_compliance ---------------------------------------------------------------
class RuleCheck(_Located):
    status: Literal["pass", "fail", "not_visible"]
    evidence: str


KITCHEN_RULES = (
    "headwear",
    "masks",
    "gloves",
    "raw_cooked_separation",
    "covered_bins",
    "pests",
    "cleanliness",
)


class KitchenCompliance(BaseModel):
    headwear: RuleCheck
    masks: RuleCheck
    gloves: RuleCheck
    raw_cooked_separation: RuleCheck
    covered_bins: RuleCheck
    pests: RuleCheck
    cleanliness: RuleCheck

    def _count(self, status: str) -> int:
        return sum(1 for rule in KITCHEN_RULES if getattr(self, rule).status == status)

    @computed_field
    def passed(self) -> int:
        return self._count("pass")

    @computed_field
    def failed(self) -> int:
        return self._count("fail")

    @computed_field
    def not_visible(self) -> int:
        return self._count("not_visible")

    @computed_field
    def compliant(self) -> bool:
        """No rule failed (rules not visible do not count against the kitchen)."""
        return self._count("fail") == 0


# Typed models of the built-in tasks. A task file without an entry here still works:
# its result is the schema-validated JSON with boxes mapped.
RESULT_MODELS: dict[str, type[BaseModel]] = {
    "product_scan": ProductScan,
    "shelf_audit": ShelfAudit,
    "price_tags": PriceTags,
    "storefront": Storefront,
    "kitchen_compliance": KitchenCompliance,
}


# --- envelope -------------------------------------------------------------------------
class ImageInfo(BaseModel):
    width: int = Field(description="Original width in pixels, after EXIF rotation.")
    height: int = Field(description="Original height in pixels, after EXIF rotation.")
    format: str
    bytes: int
    sent_width: int = Field(description="Width of the image sent to the model.")
    sent_height: int


class ScanUsage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ScanTimings(BaseModel):
    preprocess: float
    engine: float
    total: float


class ScanResult(BaseModel):
    id: str
    object: Literal["scan.result"] = "scan.result"
    task: str
    task_version: str
    model: str
    created: int
    locale: str
    images: list[ImageInfo]
    result: (
        ProductScan | ShelfAudit | PriceTags | Storefront | KitchenCompliance | dict[str, Any]
    ) = Field(description="Typed per task; see GET /v1/tasks for each task's schema.")
    usage: ScanUsage
    timings_ms: ScanTimings
    warnings: list[str] = Field(default_factory=list)
