"""What every benchmark prints and writes beside its figures: the machine it ran on, and each goal's figure
next to its goal."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass

from services.common.settings import Settings


def machine_facts(accelerator: str) -> dict[str, object]:
    """The accelerator VMs ran with, the cores, the CPU model and the load before the run."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "accelerator": accelerator,
        "cores": os.cpu_count(),
        "cpu": model or platform.machine(),
        "load_before": round(os.getloadavg()[0], 2),
    }


def facts_of(settings: Settings) -> dict[str, object]:
    """The facts of a platform with these settings: its accelerator as the orchestrator chose it (accel.json)."""
    accel_file = settings.image_root / "accel.json"
    return machine_facts(json.loads(accel_file.read_text()).get("accel", "unknown") if accel_file.exists() else "unknown")


def describe(facts: dict[str, object]) -> str:
    return (
        f"machine: {facts['cores']} cores ({facts['cpu']}), accelerator {facts['accelerator']}, load {facts['load_before']} before the run"
    )


@dataclass(frozen=True)
class Goal:
    """One figure of the issue's table: what it measures, its value, the goal, and whether lower is better."""

    name: str
    value: float | None
    goal: float
    unit: str
    lower_is_better: bool = True

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value < self.goal if self.lower_is_better else self.value >= self.goal

    def line(self) -> str:
        sign = "<" if self.lower_is_better else ">="
        value = "not measured" if self.value is None else f"{self.value:g} {self.unit}"
        verdict = {True: "met", False: "NOT met", None: "-"}[self.met]
        return f"  {self.name:<58} {value:>16}   goal {sign} {self.goal:g} {self.unit:<6} {verdict}"

    def as_json(self) -> dict[str, object]:
        return {"value": self.value, "goal": self.goal, "unit": self.unit, "lower_is_better": self.lower_is_better, "met": self.met}


def print_goals(goals: list[Goal]) -> dict[str, object]:
    """Prints the goals' table; their JSON by name."""
    print("goals:")
    for goal in goals:
        print(goal.line())
    return {goal.name: goal.as_json() for goal in goals}
