"""lmms-eval adds a plugin's ``tasks`` folder to its task search path; ivcprune ships no tasks."""
