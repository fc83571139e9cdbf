"""Stage 5: what a search gives the user: the front and the chosen trial, results, report, export and push."""
