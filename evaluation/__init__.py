"""Scoring exported models with onnxruntime on the test split, the random and popularity
baselines, and the leaderboard."""
