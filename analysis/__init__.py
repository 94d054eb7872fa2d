"""Analysis: the leaderboard summary, plots and report figures, read from results and run directories."""
