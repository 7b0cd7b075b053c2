"""Statistics of one speculative decoding run, filled in by the decoding loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class SpecStats:
    """Counters for one run. The loop calls `record_round` once per target (verify) call.

    rounds        target verification calls (one per speculation round)
    drafted       draft tokens proposed, summed over rounds (sum of K per round)
    accepted      draft tokens the target accepted
    emitted       tokens handed to the caller (accepted + one correction/bonus per round,
                  minus what EOS or max_tokens cut off)
    draft_calls   draft-model forward calls
    draft_time_s / verify_time_s   wall time spent drafting / verifying (0 if not timed)
    accepted_per_round, lookahead_per_round   one entry per round (for plots and adaptive K)
    """

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
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
        self.emitted += num_emitted
        self.accepted_per_round.append(num_accepted)
        self.lookahead_per_round.append(num_drafted)

    @property
    def target_calls(self) -> int:
        return self.rounds

    @property
    def acceptance_rate(self) -> float:
        """Fraction of drafted tokens accepted (an estimate of alpha for a fixed K)."""
        return self.accepted / self.drafted if self.drafted else 0.0

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
            mean_accepted_length=self.mean_accepted_length,
            tokens_per_round=self.tokens_per_round,
        )
        return d

    def summary(self) -> str:
        return (
            f"{self.emitted} tokens in {self.rounds} target calls "
            f"({self.tokens_per_round:.2f} tokens/call), "
            f"acceptance {self.acceptance_rate:.1%} ({self.accepted}/{self.drafted} drafted), "
            f"mean accepted length {self.mean_accepted_length:.2f}"
        )
