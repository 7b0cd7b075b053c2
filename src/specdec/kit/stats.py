"""Statistics of one speculative decoding run, filled in by the decoding loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters for one run. The loop calls `record_round` once per target (verify) call.

    rounds        target verification calls (one per speculation round)
    drafted       draft tokens proposed, summed over rounds (sum of K per round)
    accepted      draft tokens the target accepted
    rejections    rounds that ended on a rejected draft (the others accepted all K)
    emitted       tokens handed to the caller (accepted + one correction/bonus per round,
                  minus what EOS or max_tokens cut off)
    draft_calls   draft-model forward calls
    draft_time_s / verify_time_s   wall time spent drafting / verifying (0 if not timed)
    accepted_per_round, lookahead_per_round   one entry per round (for plots and adaptive K)

    A plain round (K = 0: the Week 4 fallback decodes with the target alone) is recorded as
    `record_round(0, 0, emitted)`: it counts as a target call, drafts nothing and rejects nothing,
    so it leaves `alpha_estimate` untouched. `fallback_rounds` counts those rounds.
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    rejections: int = 0
    emitted: int = 0
    draft_calls: int = 0
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0
    accepted_per_round: list[int] = field(default_factory=list)
    lookahead_per_round: list[int] = field(default_factory=list)

    def record_round(self, num_drafted: int, num_accepted: int, num_emitted: int) -> None:
        """Account for one round: K drafted, n accepted, and the tokens actually emitted."""
        self.rounds += 1
        self.drafted += num_drafted
        self.accepted += num_accepted
        self.rejections += int(num_accepted < num_drafted)
        self.emitted += num_emitted
        self.accepted_per_round.append(num_accepted)
        self.lookahead_per_round.append(num_drafted)

    @property
    def target_calls(self) -> int:
        return self.rounds

    @property
    def fallback_rounds(self) -> int:
        """Plain rounds (K = 0): target calls made without a draft, as the fallback does."""
        return sum(1 for k in self.lookahead_per_round if k == 0)

    @property
    def speculative_rounds(self) -> int:
        """Rounds that drafted at least one token (vLLM's `num_drafts`)."""
        return self.rounds - self.fallback_rounds

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens accepted.

        Not alpha: drafts after the first rejection of a round are never tested, so for a fixed K
        this is alpha (1 - alpha^K) / ((1 - alpha) K), equal to alpha only at K = 1. Use
        `alpha_estimate` for alpha.
        """
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha_estimate(self) -> float:
        """Per-token acceptance probability alpha: accepted / drafts actually tested.

        Each round tests its drafts in order until the first rejection, so the tested drafts are
        the accepted ones plus one per rejection (the maximum-likelihood estimate of alpha under
        the book's geometric model).
        """
        tested = self.accepted + self.rejections
        return self.accepted / tested if tested else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of draft tokens accepted per round."""
        return self.accepted / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Mean tokens emitted per target call (E in the book; 1.0 for plain decoding)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(
            target_calls=self.target_calls,
            acceptance_rate=self.acceptance_rate,
            alpha_estimate=self.alpha_estimate,
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_round=self.tokens_per_round,
            fallback_rounds=self.fallback_rounds,
            speculative_rounds=self.speculative_rounds,
        )
        return d

    def summary(self) -> str:
        return (
            f"{self.emitted} tokens in {self.rounds} target calls "
            f"({self.tokens_per_round:.2f} tokens/call), "
            f"acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.drafted} drafted), "
            f"mean accepted length {self.mean_accepted_length:.2f}"
        )
