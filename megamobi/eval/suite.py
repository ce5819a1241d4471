"""The paper's benchmark suite (Table 4 of the MobiLlama paper) and its published rows.

The paper names the benchmarks and the shots (10 HellaSwag, 25 ARC-Challenge, 5 Winogrande, 5 MMLU,
0 for the rest) but not the metric of each column; the choices below follow the Open LLM
Leaderboard conventions the paper cites (docs/eval.md explains each one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SuiteTask:
    column: str      # the column header in the paper's Table 4
    task: str        # the lm-eval 0.4 task (or group) name
    num_fewshot: int
    metric: str      # the lm-eval metric reported in that column (scaled x100 in the table)


# In the column order of Table 4.
PAPER_SUITE: tuple[SuiteTask, ...] = (
    SuiteTask("HellaSwag", "hellaswag", 10, "acc_norm"),
    SuiteTask("Truthfulqa", "truthfulqa_mc2", 0, "acc"),  # lm-eval reports the mc2 score as "acc"
    SuiteTask("MMLU", "mmlu", 5, "acc"),
    SuiteTask("Arc_C", "arc_challenge", 25, "acc_norm"),
    SuiteTask("CrowsPairs", "crows_pairs_english", 0, "pct_stereotype"),
    SuiteTask("piqa", "piqa", 0, "acc_norm"),
    SuiteTask("race", "race", 0, "acc"),
    SuiteTask("siqa", "social_iqa", 0, "acc"),
    SuiteTask("winogrande", "winogrande", 5, "acc"),
)

# Table 4 of the paper, copied exactly (percent). The paper's own Average is over all nine columns.
PAPER_ROWS: dict[str, dict[str, object]] = {
    "MobiLlama 0.5B (paper)": {
        "params": "0.5B",
        "scores": {"HellaSwag": 52.52, "Truthfulqa": 38.05, "MMLU": 26.45, "Arc_C": 29.52, "CrowsPairs": 64.03,
                   "piqa": 72.03, "race": 33.68, "siqa": 40.22, "winogrande": 57.53},
        "average": 46.00,
    },
    "MobiLlama 0.8B (paper)": {
        "params": "0.8B",
        "scores": {"HellaSwag": 54.09, "Truthfulqa": 38.48, "MMLU": 26.92, "Arc_C": 30.20, "CrowsPairs": 64.82,
                   "piqa": 73.17, "race": 33.37, "siqa": 41.60, "winogrande": 57.45},
        "average": 46.67,
    },
}


def suite_task(name: str) -> SuiteTask | None:
    """The suite entry of an lm-eval task name (for its shots and headline metric), if any."""
    return next((t for t in PAPER_SUITE if t.task == name), None)
