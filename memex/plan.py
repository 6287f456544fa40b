"""Which samples a run generates, in which shard: rounds of (prompts, sample-index range).

A run generates in rounds. Round r gives each of its prompts the samples [lo, hi) (sample index i
of a prompt always has the seed sample_seed(run seed, prompt id, i), so a round adds samples, it
never redoes one). A fixed budget is one round: every prompt, [0, samples_per_prompt). The
adaptive budget (memex/stages/audit.py) adds rounds for the prompts that show signs of
memorization. Each round is written to <run>/rounds/round-NNN.json before its shards are
generated, and read back on resume, so a rerun regenerates nothing and decides nothing anew: a
round's file keeps the rule that chose its prompts (`rule`: budget.continue_*), and a decision to
stop is written too, as a round of no prompts.

Shards: a round's (prompt, sample) units, prompt-major, cut into shards of `shard_size` units,
numbered after the previous round's. `shard_size` is rounded up to a multiple of the UNet batch
(`tie_shard_size`): the sampler runs fixed-shape batches (memex/sampling.py), so a shard of 64
at batch 256 would pad 192 rows of every shard, computing 4x the samples it keeps (issue 13 measured
223 s against 62 s for 2,048 samples; bench/RESULTS.md, "No wasted UNet work": 1,024 UNet rows to
keep 256 before, the same evaluations as the plain loop after). Tied, only a round's last shard pads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Optional

from memex.storage import Store

ROUND_DIGITS = 3


def tie_shard_size(shard_size: int, batch_size: int) -> int:
    """The smallest multiple of batch_size that is >= shard_size: shards hold whole batches."""
    return -(-max(shard_size, 1) // batch_size) * batch_size


@dataclass(frozen=True)
class Round:
    index: int
    prompt_rows: Optional[tuple[int, ...]]  # rows of prompts.parquet; None: every prompt
    lo: int  # each prompt's samples [lo, hi)
    hi: int
    shard_size: int  # tied to the batch (tie_shard_size)
    first_shard: int  # global index of the round's first shard
    n_prompts: int  # len(prompt_rows), or the run's prompt count when None
    # the settings that chose a later round's prompts (budget.continue_factor, budget.continue_triage_z);
    # None: round 0, a fixed budget, or a round written before it was kept
    rule: Optional[dict] = None

    @property
    def units(self) -> int:
        return self.n_prompts * (self.hi - self.lo)

    @property
    def n_shards(self) -> int:
        return -(-self.units // self.shard_size)

    def row(self, q: int) -> int:
        """The prompt row of the round's q-th prompt."""
        return q if self.prompt_rows is None else self.prompt_rows[q]

    def to_json(self) -> dict:
        d = asdict(self)
        d["prompt_rows"] = None if self.prompt_rows is None else list(self.prompt_rows)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Round":
        rows = d["prompt_rows"]
        return cls(**{**d, "prompt_rows": None if rows is None else tuple(rows)})


@dataclass(frozen=True)
class Shard:
    """Global shard `index`: units [start, stop) of round `round` (unit u = (its prompt u // m, lo + u % m))."""

    index: int
    round: int
    start: int
    stop: int


class SamplePlan:
    """The rounds of one run folder and the shards they make."""

    def __init__(self, rounds: list[Round]):
        self.rounds = rounds
        self._pos: dict[int, dict[int, int]] = {}  # round -> {prompt row: position}, built on first use

    def _position(self, r: Round, prompt_row: int) -> Optional[int]:
        if r.prompt_rows is None:
            return prompt_row if prompt_row < r.n_prompts else None
        if r.index not in self._pos:
            self._pos[r.index] = {row: q for q, row in enumerate(r.prompt_rows)}
        return self._pos[r.index].get(prompt_row)

    # ---- persistence -----------------------------------------------------------------------
    @staticmethod
    def path(store: Store, index: int) -> str:
        return store.join("rounds", f"round-{index:0{ROUND_DIGITS}d}.json")

    @classmethod
    def read(cls, store: Store) -> "SamplePlan":
        paths = store.listing(store.join("rounds"), "round-*.json")  # (a store failure named, as other listings)
        return cls([Round.from_json(store.read_json(p)) for p in paths])

    def add_round(self, store: Store, prompt_rows: Optional[list[int]], n_prompts: int, lo: int, hi: int,
                  shard_size: int, batch_size: int, rule: Optional[dict] = None) -> Round:
        """Append round len(rounds) (written atomically), or return it when a rerun finds it written.
        prompt_rows []: the budget stops here (a round of no samples, so a rerun does not decide again)."""
        index = len(self.rounds)
        first = self.rounds[-1].first_shard + self.rounds[-1].n_shards if self.rounds else 0
        rnd = Round(index, None if prompt_rows is None else tuple(prompt_rows), lo, hi,
                    tie_shard_size(shard_size, batch_size), first,
                    n_prompts if prompt_rows is None else len(prompt_rows), rule)
        store.claim(self.path(store, index), rnd.to_json(), f"round {index} of run folder {store.uri}",
                    "Use another run.name for a new experiment.")
        self.rounds.append(rnd)
        return rnd

    def check_budget(self, store: Store, bounds: list[int], first_rows: Optional[list[int]], keys: str,
                     rule: Optional[dict] = None) -> None:
        """The rounds written agree with the budget this run asks for: round r holds samples
        [bounds[r-1] (0 for round 0), bounds[r]), round 0 the prompt rows `first_rows` (None: every
        prompt), and each later round was chosen by `rule` (where its file says). The budget is not
        part of run.json (a fixed and an adaptive audit of one model share the default run name), so a
        resume with other bounds used the old rounds' prompts with the new bounds: samples generated
        twice (byte-identical, distance 0: false cliques) or never; with another rule, rounds chosen
        by two rules in one folder, or a stop decided again and the new round's samples never filtered
        (the filter's units were complete) while the old summary was returned."""
        from memex.storage import StorageError

        want = list(zip([0, *bounds[:-1]], bounds))
        # a stop (a round of no prompts) holds no samples: only where it stopped must agree
        have = [(r.lo, r.hi if r.n_prompts or k >= len(want) else want[k][1]) for k, r in enumerate(self.rounds)]
        rows = None if first_rows is None else tuple(first_rows)
        if len(have) > len(want) or have != want[:len(have)] or (self.rounds and self.rounds[0].prompt_rows != rows):
            what = "" if have == want[:len(have)] else f"samples {have}, and this run asks for {want}"
            what = what or "a first round of other prompts (triage.keep)"
            raise StorageError(f"run folder {store.uri} holds rounds of {what} ({keys}). Resuming would generate "
                               "some samples twice and leave others out. Nothing was changed. Use another "
                               f"run.name, or the settings the run was started with (its rounds/*.json).")
        # the keys a round's file holds (one written before the triage keys were recorded has none of them)
        now = {k: (rule or {}).get(k) for r in self.rounds if r.rule is not None for k in r.rule}
        other = next((r for r in self.rounds if r.rule is not None and any(r.rule[k] != now[k] for k in r.rule)),
                     None)
        if other is not None:
            from memex.storage import differences_text

            mine = {k: now[k] for k in other.rule}
            raise StorageError(f"run folder {store.uri} holds round {other.index}, whose prompts were chosen with "
                               f"other settings ({differences_text(other.rule, mine)}). Resuming would mix "
                               "two rules in one run's rounds. Nothing was changed. Use another run.name, or the "
                               "settings the run was started with (its rounds/*.json).")

    # ---- shards ----------------------------------------------------------------------------
    def shards(self, rounds: Optional[list[int]] = None) -> list[Shard]:
        out = []
        for r in self.rounds:
            if rounds is None or r.index in rounds:
                out += [Shard(r.first_shard + k, r.index, s, min(s + r.shard_size, r.units))
                        for k, s in enumerate(range(0, r.units, r.shard_size))]
        return out

    def units(self, shard: Shard) -> Iterator[tuple[int, int]]:
        """(prompt row, sample index) of each unit of a shard, prompt-major."""
        r = self.rounds[shard.round]
        m = r.hi - r.lo
        for u in range(shard.start, shard.stop):
            q, i = divmod(u, m)
            yield r.row(q), r.lo + i

    def shards_of(self, prompt_row: int) -> list[int]:
        """Global indices of the shards holding any sample of a prompt row (every round)."""
        out = []
        for r in self.rounds:
            q = self._position(r, prompt_row)
            if q is not None:
                m, first = r.hi - r.lo, r.first_shard
                out += range(first + q * m // r.shard_size, first + ((q + 1) * m - 1) // r.shard_size + 1)
        return out

    def samples_of(self, prompt_row: int) -> int:
        """How many samples a prompt row has over all rounds."""
        return sum(r.hi - r.lo for r in self.rounds if self._position(r, prompt_row) is not None)
