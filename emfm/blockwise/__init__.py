"""The blockwise engine of ``emfm predict``, ``emfm features`` and ``emfm cluster``: a block grid, executors
(here or on Dask), resumable output stores and the job every block task receives."""
