"""Plotly figures and self-contained HTML reports built from results on disk. Never imports torch."""
