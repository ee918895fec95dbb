"""The synthetic task's language: true captions of a scene, premises, and hypotheses with a chosen label."""
from __future__ import annotations

import random
from typing import Callable, Optional

from data_utils.synthetic.scene import COLORS, Scene, SceneObject
from mue_fairseq.metrics.synthetic_content import GRID, HOLLOW, SHAPES

# Properties a drawing cannot show: hypotheses about them are always neutral.
HIDDEN_PROPERTIES = ("heavy", "soft", "warm", "wet", "old", "new")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}

ENTAILMENT, NEUTRAL, CONTRADICTION = "entailment", "neutral", "contradiction"
LABELS = (ENTAILMENT, NEUTRAL, CONTRADICTION)

# Truth values of the three-valued (Kleene) logic used to label hypotheses.
TRUE, FALSE, UNKNOWN = "T", "F", "U"


# ----------------------------------------------------------------------------- captions


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(obj: SceneObject, with_size: bool) -> str:
    words = ([obj.size] if with_size else []) + [obj.color_word, obj.shape]
    return _article(" ".join(words))


def _position_phrase(obj: SceneObject) -> str:
    if obj.col == 0:
        return "on the left"
    if obj.col == GRID - 1:
        return "on the right"
    return {0: "at the top", GRID - 1: "at the bottom"}.get(obj.row, "in the middle")


def describe(objects: tuple[SceneObject, ...] | list[SceneObject], variant: int) -> str:
    """One true description of a set of objects (sorted left to right); ``variant`` picks a paraphrase."""
    objects = sorted(objects, key=lambda o: (o.col, o.row))
    n = len(objects)
    if n == 1:
        obj = objects[0]
        phrase = _noun_phrase(obj, with_size=True)
        if variant % 2 == 0:
            return f"{phrase} {_position_phrase(obj)}"
        return f"{_position_phrase(obj)} {phrase}"
    if n == 2:
        a, b = objects
        pa, pb = _noun_phrase(a, True), _noun_phrase(b, True)
        if a.col != b.col:
            templates = (f"{pa} left of {pb}", f"{pb} right of {pa}", f"{pa} to the left of {pb}",
                         f"{pb} to the right of {pa}")
        else:
            top, bottom = (pa, pb) if a.row < b.row else (pb, pa)
            templates = (f"{top} above {bottom}", f"{bottom} below {top}", f"{top} over {bottom}",
                         f"{bottom} under {top}")
        return templates[variant % len(templates)]
    phrases = [_noun_phrase(o, with_size=False) for o in objects]
    head, last = phrases[:-1], phrases[-1]
    if variant % 3 == 0:
        return " ".join(head) + f" and {last}"
    if variant % 3 == 1:
        return f"{head[0]} with " + " ".join(head[1:]) + f" and {last}"
    return f"{head[0]} beside " + " ".join(head[1:]) + f" and {last}"


def caption_variants(scene: Scene, count: int, rng: random.Random) -> list[str]:
    """``count`` distinct true captions of the whole scene (repeats only if too few paraphrases)."""
    n_templates = {1: 2, 2: 4}.get(len(scene.objects), 3)
    order = list(range(n_templates))
    rng.shuffle(order)
    return [describe(scene.objects, order[i % n_templates]) for i in range(count)]


# ----------------------------------------------------------------------------- hypotheses


def _kleene_and(values: list[str]) -> str:
    if FALSE in values:
        return FALSE
    if UNKNOWN in values:
        return UNKNOWN
    return TRUE


_TRUTH_TO_LABEL = {TRUE: ENTAILMENT, FALSE: CONTRADICTION, UNKNOWN: NEUTRAL}
_LABEL_TO_TRUTH = {v: k for k, v in _TRUTH_TO_LABEL.items()}


def _count_phrase(k: int) -> str:
    return "there is one shape" if k == 1 else f"there are {NUMBER_WORDS[k]} shapes"


def _attribute_claim(obj: SceneObject, truth: str, rng: random.Random) -> Optional[str]:
    """An attribute word whose claim about ``obj`` has the given truth value, or None."""
    options = []
    if truth == TRUE:
        options.append(obj.size)
        options.append(obj.color_word)
    elif truth == FALSE:
        options.append("small" if obj.size == "large" else "large")
        if obj.color is not None:
            options.append(rng.choice([c for c in sorted(COLORS) if c != obj.color]))
            options.append(HOLLOW)
    else:
        if obj.color is None:
            options.append(rng.choice(sorted(COLORS)))
    return rng.choice(options) if options else None


def _descriptor(obj: SceneObject, truth: str, rng: random.Random) -> Optional[str]:
    """A referring expression for ``obj`` whose presupposition has the given truth value."""
    if truth == TRUE:
        if obj.color is not None and rng.random() < 0.5:
            return f"{obj.color} {obj.shape}"
        return obj.shape
    if truth == FALSE:
        if obj.color is None:
            return None
        return f"{rng.choice([c for c in sorted(COLORS) if c != obj.color])} {obj.shape}"
    if obj.color is None:
        return f"{rng.choice(sorted(COLORS))} {obj.shape}"
    return None


def _truth_combos(target: str, k: int, rng: random.Random) -> list[tuple[str, ...]]:
    """All k-tuples of truth values whose Kleene conjunction is ``target``, shuffled."""
    combos = [()]
    for _ in range(k):
        combos = [c + (t,) for c in combos for t in (TRUE, FALSE, UNKNOWN)]
    combos = [c for c in combos if _kleene_and(list(c)) == target]
    rng.shuffle(combos)
    return combos


def _hyp_exists(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    present = [o.shape for o in scene.objects]
    if truth == TRUE:
        return f"there is {_article(rng.choice(present))}"
    if truth == FALSE:
        absent = [s for s in SHAPES if s not in present]
        return f"there is {_article(rng.choice(absent))}" if absent else None
    return None


def _hyp_hidden_property(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if truth != UNKNOWN:
        return None
    return f"the {rng.choice(scene.objects).shape} is {rng.choice(HIDDEN_PROPERTIES)}"


def _hyp_count(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    n = len(scene.objects)
    if truth == TRUE:
        return _count_phrase(n)
    if truth == FALSE:
        return _count_phrase(rng.choice([k for k in NUMBER_WORDS if k != n]))
    return None


def _hyp_attribute(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    objects = list(scene.objects)
    rng.shuffle(objects)
    for obj in objects:
        word = _attribute_claim(obj, truth, rng)
        if word is not None:
            return f"the {obj.shape} is {word}"
    return None


def _hyp_colored_exists(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if truth == FALSE and rng.random() < 0.4:
        absent = [s for s in SHAPES if scene.by_shape(s) is None]
        if absent:
            return f"there is {_article(rng.choice(sorted(COLORS)) + ' ' + rng.choice(absent))}"
    objects = list(scene.objects)
    rng.shuffle(objects)
    for obj in objects:
        if truth == TRUE and obj.color is not None:
            return f"there is {_article(obj.color + ' ' + obj.shape)}"
        if truth == FALSE and obj.color is not None:
            other = rng.choice([c for c in sorted(COLORS) if c != obj.color])
            return f"there is {_article(other + ' ' + obj.shape)}"
        if truth == UNKNOWN and obj.color is None:
            return f"there is {_article(rng.choice(sorted(COLORS)) + ' ' + obj.shape)}"
    return None


_RELATIONS = ("left of", "right of", "above", "below")


def _relation_truth(a: SceneObject, rel: str, b: SceneObject) -> Optional[str]:
    """Truth of "a <rel> b" on the grid; None when the grid cannot decide it (same column/row)."""
    if rel in ("left of", "right of"):
        if a.col == b.col:
            return None
        return TRUE if (a.col < b.col) == (rel == "left of") else FALSE
    if a.row == b.row:
        return None
    return TRUE if (a.row < b.row) == (rel == "above") else FALSE


def _hyp_relation(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    pairs = [(a, b) for a in scene.objects for b in scene.objects if a is not b]
    rng.shuffle(pairs)
    for combo in _truth_combos(truth, 3, rng):
        rel_truth, truth_a, truth_b = combo
        for a, b in pairs:
            rels = [r for r in _RELATIONS if _relation_truth(a, r, b) == rel_truth]
            if not rels:
                continue
            da, db = _descriptor(a, truth_a, rng), _descriptor(b, truth_b, rng)
            if da is None or db is None:
                continue
            return f"the {da} is {rng.choice(rels)} the {db}"
    return None


def _hyp_conjunction(scene: Scene, truth: str, rng: random.Random) -> Optional[str]:
    if len(scene.objects) < 2:
        return None
    for combo in _truth_combos(truth, 2, rng):
        a, b = rng.sample(scene.objects, 2)
        wa, wb = _attribute_claim(a, combo[0], rng), _attribute_claim(b, combo[1], rng)
        if wa is not None and wb is not None:
            return f"the {a.shape} is {wa} and the {b.shape} is {wb}"
    return None


HYPOTHESIS_BUILDERS: dict[str, Callable[[Scene, str, random.Random], Optional[str]]] = {
    "exists": _hyp_exists,
    "hidden_property": _hyp_hidden_property,
    "count": _hyp_count,
    "attribute": _hyp_attribute,
    "colored_exists": _hyp_colored_exists,
    "relation": _hyp_relation,
    "conjunction": _hyp_conjunction,
}
HYPOTHESIS_LEVELS = {
    "exists": 1,
    "hidden_property": 1,
    "count": 2,
    "attribute": 2,
    "colored_exists": 2,
    "relation": 3,
    "conjunction": 4,
}


def make_hypothesis(scene: Scene, label: str, rng: random.Random, weights: dict[str, float]) -> tuple[str, str]:
    """A hypothesis with the requested label; returns ``(hypothesis, type)``.

    Types are tried in weighted random order; ``hidden_property`` always yields a neutral
    hypothesis, so every label is reachable for every scene.
    """
    truth = _LABEL_TO_TRUTH[label]
    types = [t for t, w in weights.items() if w > 0]
    keys = {t: rng.random() ** (1.0 / weights[t]) for t in types}
    for hyp_type in sorted(types, key=lambda t: -keys[t]):
        hyp = HYPOTHESIS_BUILDERS[hyp_type](scene, truth, rng)
        if hyp is not None:
            return hyp, hyp_type
    for fallback in ("hidden_property", "exists", "count"):
        hyp = HYPOTHESIS_BUILDERS[fallback](scene, truth, rng)
        if hyp is not None:
            return hyp, fallback
    raise RuntimeError(f"no hypothesis with label {label!r} for scene {scene}")


def make_premise(scene: Scene, rng: random.Random) -> tuple[str, int]:
    """A true description of one or two of the scene's shapes; returns (premise, shapes mentioned)."""
    k = rng.randint(1, min(2, len(scene.objects)))
    subset = rng.sample(scene.objects, k)
    return describe(subset, rng.randrange(4)), k
