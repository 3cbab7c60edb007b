"""The planner's one error type: bad input, named by its config field (the CLI exits 2 on it)."""


class PlanError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
