"""The decoder's decaying exit threshold Theta(t) = beta*theta + (1-beta)*exp(-tau*t/N)."""
import math


def decoder_threshold(theta: float, beta: float, tau: float, step: int, num_steps: int) -> float:
    """Threshold for decoding step `step` (0-based) out of `num_steps` steps.

    As in the authors' code, t = step + 1 and N = num_steps (max_len + 1), so the threshold
    falls from about beta*theta + (1-beta) towards beta*theta + (1-beta)*exp(-tau).
    """
    t = step + 1
    return beta * theta + (1.0 - beta) * math.exp(-tau * t / max(num_steps, 1))
