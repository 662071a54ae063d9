"""Ask the scan: questions about a volume or image, answered by the volume-aware Q-Former.

`engine.ask.questions` holds the question families (assets/qa/question_families.json):
matching a user's question to a family, candidate answers, answer normalisation.
"""
