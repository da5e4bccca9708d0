"""User-facing error types: the CLI turns each into exit code 2 and one line."""

from __future__ import annotations


class SynthgenError(Exception):
    """A mistake the user can fix (bad recipe, unreadable cohort, missing model).

    Carries where the mistake is (file and field path or row) so the message can name it.
    """

    def __init__(self, message: str, *, file: str | None = None, where: str | None = None):
        self.message = message
        self.file = file
        self.where = where
        super().__init__(self.describe())

    def describe(self) -> str:
        prefix = ": ".join(part for part in (self.file, self.where) if part)
        return f"{prefix}: {self.message}" if prefix else self.message


class RecipeError(SynthgenError):
    """The recipe is invalid; `where` is the YAML field path, e.g. `labels.age.std`."""


class CohortError(SynthgenError):
    """A source cohort row or image is unusable; `where` is `row N`, never a patient id."""


class ModelError(SynthgenError):
    """The base model or LoRA cannot be loaded."""


class OutputError(SynthgenError):
    """The output directory holds something that must not be overwritten or is incomplete."""


class OptionError(SynthgenError):
    """A command-line option or a launcher's environment variable is wrong; `where` names it.

    No file is at fault, so the CLI never prefixes the recipe's path.
    """


class FieldError(ValueError):
    """Raised inside a pydantic model validator to name the field at fault (`std`, not the label)."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)
