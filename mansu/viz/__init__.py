"""Pure plotly figure builders and artifact loaders for the app (no streamlit import here).

Each loader reads one run artifact and returns None when it is missing, so every page can say
"not computed for this run" instead of raising.
"""
