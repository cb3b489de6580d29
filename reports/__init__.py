"""Plotly figures and one self-contained HTML page built from plain results (JSON-like dicts).

Nothing here runs a simulation or touches a model: ``reports.inputs`` documents and checks the
shapes it reads, ``reports.tables`` compares simulated numbers with the paper's,
``reports.figures`` draws, ``reports.html`` embeds figures deterministically and
``reports.page`` assembles the report.
"""
