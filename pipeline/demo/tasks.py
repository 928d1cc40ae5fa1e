"""The demo's synthetic tasks: a small word vocabulary and what each task does to a list of words.

A prompt reads `<task> : w1 w2 w3 =` and its reference is the task applied to the words,
e.g. `reverse : cat dog fox =` -> `fox dog cat`. Words in one prompt are distinct, so every
task has one right answer and a copy of the input is wrong for every task. A multiple-choice
question offers the right answer among what other tasks answer for the same words.
"""
import random

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS, UNK = SPECIAL_TOKENS

WORDS = [  # alphabetical, so "sort" and "next" follow this order
    "ant", "bee", "cat", "cow", "dog", "eel", "elk", "fox", "gnu", "hen", "jay", "kid",
    "owl", "pig", "ram", "rat", "yak", "zebu",
]
NEXT_WORD = {w: WORDS[(i + 1) % len(WORDS)] for i, w in enumerate(WORDS)}

TASKS = {
    "copy": lambda words: list(words),           # the base model's pretraining task
    "reverse": lambda words: words[::-1],
    "sort": sorted,
    "next": lambda words: [NEXT_WORD[w] for w in words],
    "upper": lambda words: [w.upper() for w in words],
    "rotate": lambda words: words[1:] + words[:1],
}

UPPER_WORDS = [w.upper() for w in WORDS]
VOCAB = SPECIAL_TOKENS + [":", "="] + list(TASKS) + WORDS + UPPER_WORDS


def prompt_text(task: str, words: list[str]) -> str:
    return f"{task} : {' '.join(words)} ="


def reference_text(task: str, words: list[str]) -> str:
    return " ".join(TASKS[task](words))


def sample_words(rng: random.Random, task: str) -> list[str]:
    if task == "copy":
        # the base's pretraining: longer inputs, so it has attended across the distances every task needs,
        # and the upper-case words too, so it can emit every word the tasks answer with
        return rng.sample(WORDS + UPPER_WORDS, rng.randint(3, 10))
    return rng.sample(WORDS, rng.randint(3, 5))


def examples(task: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, reference) pairs for one task, the same for the same seed."""
    rng = random.Random(f"{task}-{seed}")
    pairs = []
    for _ in range(n):
        words = sample_words(rng, task)
        pairs.append((prompt_text(task, words), reference_text(task, words)))
    return pairs


def choice_examples(task: str, n: int, seed: int, n_choices: int = 4) -> list[tuple[str, list[str], int]]:
    """n (prompt, choices, index of the right choice) questions for one task, the same for the same seed."""
    rng = random.Random(f"{task}-choices-{seed}")
    questions = []
    for _ in range(n):
        words = sample_words(rng, task)
        right = reference_text(task, words)
        choices = rng.sample(sorted({reference_text(other, words) for other in TASKS} - {right}), n_choices - 1)
        gold = rng.randrange(n_choices)
        choices.insert(gold, right)
        questions.append((prompt_text(task, words), choices, gold))
    return questions
