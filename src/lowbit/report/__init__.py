"""Reports from results files: the per-run table (``tables``), the generated pages (``pages``) and plots (``plots``)."""
