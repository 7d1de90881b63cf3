"""Reading results: the study report (data, statistics, tables, claims, plots), the memory planner."""
