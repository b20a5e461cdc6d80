"""Streamlit helpers shared by the pages (the library in mansu/ never imports streamlit)."""
