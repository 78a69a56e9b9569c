"""The plain-Python readers (synthetic generator, MovieLens layouts, files) and the validating
loader that lands them in the warehouse's ``raw`` schema. No Dagster import: testable alone.
"""
