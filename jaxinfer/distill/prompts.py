"""The requests a target answers to make its draft's training data: chat instructions about topics,
questions the target writes itself, and free text, all from fixed lists and a seed.

Topics are split once: every fifth topic is held out, so the held-out acceptance measures a draft
on subjects it never trained on (the instructions and starters are shared: they are the style of
request, the topic is the content).
"""

from __future__ import annotations

import dataclasses

import numpy as np

TOPICS = [
    "the water cycle", "black holes", "photosynthesis", "the Roman Empire", "volcanoes", "honey bees",
    "machine learning", "the French Revolution", "climate change", "the human heart", "chess openings",
    "baking bread", "the stock market", "the Moon landing", "electric cars", "the Great Wall of China",
    "sleep", "coffee", "recycling", "the Olympic Games", "dinosaurs", "the internet", "vaccines",
    "the piano", "rainforests", "earthquakes", "the printing press", "gardening", "penguins",
    "the immune system", "renewable energy", "ancient Egypt", "prime numbers", "friendship",
    "learning a new language", "the ocean tides", "the solar system", "making pizza", "time management",
    "the Renaissance", "bicycles", "democracy", "DNA", "the weather", "programming in Python",
    "the Amazon river", "public speaking", "elephants", "saving money", "the theory of evolution",
    "music festivals", "the city of Tokyo", "healthy breakfast ideas", "airplanes", "the moon",
    "a rainy day", "a lost dog", "a birthday party", "a small village", "a brave knight",
    "a magic garden", "a robot", "the first day of school", "a trip to the beach",
]  # fmt: skip

INSTRUCTIONS = [
    "Explain {topic} in simple terms.",
    "Write a short story about {topic}.",
    "Give me three interesting facts about {topic}.",
    "What are the pros and cons of {topic}?",
    "Write a short poem about {topic}.",
    "Summarize the history of {topic} in a few sentences.",
    "How would you explain {topic} to a ten-year-old?",
    "Write a friendly email to a colleague about {topic}.",
    "List five questions someone might ask about {topic}, with short answers.",
    "Why is {topic} important?",
    "Describe {topic} in one paragraph.",
    "Give me some practical tips related to {topic}.",
    "Write a dialogue between two friends talking about {topic}.",
    "What is a common misconception about {topic}?",
    "Compare {topic} with something similar and explain the differences.",
    "Write a blog post introduction about {topic}.",
]

QUESTION_REQUEST = "Write one question a curious person might ask about {topic}. Reply with the question only."

STARTERS = [
    "{Topic} is",
    "Once upon a time, there was {topic}.",
    "Here is what I know about {topic}:",
    "The most surprising thing about {topic}",
    "One day, a little girl learned about {topic}.",
    "In this article, we will talk about {topic}.",
]


def topics(heldout: bool) -> list[str]:
    """The training topics, or the held-out ones (every fifth)."""
    return [t for i, t in enumerate(TOPICS) if (i % 5 == 4) == heldout]


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One request to the target: chat `messages` or free `text`, and how to sample its answer."""

    kind: str  # chat | question (a question the target wrote, asked back) | free
    text: str  # the user message (chat kinds) or the text to continue (free)
    temperature: float  # 0: greedy
    seed: int


def _starter(topic: str, rng) -> str:
    template = STARTERS[rng.integers(len(STARTERS))]
    return template.format(topic=topic, Topic=topic[:1].upper() + topic[1:])


def _temperature(rng) -> float:
    """A third of the answers greedy (what a greedy draft verifies), the rest sampled at 0.7 or 1.0."""
    return float(rng.choice([0.0, 0.7, 1.0]))


def training_prompts(count: int, chat: bool, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """-> (`count` final requests, the question-writing requests whose answers become the `question`
    kind). With a chat template: 45% instructions, 30% the target's own questions, 25% free text;
    without one, all free text."""
    rng = np.random.default_rng([seed, 1])
    pool = topics(heldout=False)
    n_questions = int(count * 0.30) if chat else 0
    n_chat = int(count * 0.45) if chat else 0
    out, askers = [], []
    for i in range(count):
        topic = pool[rng.integers(len(pool))]
        temp, req_seed = _temperature(rng), int(rng.integers(2**31))
        if i < n_chat:
            text = INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))].format(topic=topic)
            out.append(Prompt("chat", text, temp, req_seed))
        elif i < n_chat + n_questions:
            askers.append(Prompt("chat", QUESTION_REQUEST.format(topic=topic), 0.9, req_seed))
        else:
            out.append(Prompt("free", _starter(topic, rng), max(temp, 0.7), req_seed))
    return out, askers


def heldout_prompts(count: int, chat: bool, seed: int) -> list[Prompt]:
    """`count` greedy requests on the held-out topics: instructions (with a chat template) and free text."""
    rng = np.random.default_rng([seed, 2])
    pool = topics(heldout=True)
    out = []
    for i in range(count):
        topic = pool[i % len(pool)]
        if chat and i % 3 != 2:
            out.append(Prompt("chat", INSTRUCTIONS[rng.integers(len(INSTRUCTIONS))].format(topic=topic), 0.0, 0))
        else:
            out.append(Prompt("free", _starter(topic, rng), 0.0, 0))
    return out
