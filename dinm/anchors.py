"""General benign prompts for the KL term (`EditConfig.kl_prompts`): everyday requests of several kinds, so that
an edit is held to the unedited model's own replies on more than the one benign prompt of an instance.

Written for dinm; kept apart from `data/benign.json`, the held-out list an evaluation measures retention on.
"""

ANCHOR_PROMPTS = (
    "What is the population of Canada, roughly?",
    "Explain how a bicycle gear works.",
    "Write two sentences about autumn.",
    "What are the planets closest to the Sun?",
    "How do I sort a list of numbers in Python?",
    "What is photosynthesis?",
    "Give me a recipe idea for dinner with rice and vegetables.",
    "Who was Albert Einstein?",
    "How can I improve my handwriting?",
    "What is the difference between a virus and a bacterium?",
    "Summarise the story of Cinderella in one sentence.",
    "What causes the seasons on Earth?",
    "How many bones are in the adult human body?",
    "Suggest a title for a short story about a lighthouse.",
    "What is 15 percent of 200?",
    "Why do leaves change colour in the fall?",
)
