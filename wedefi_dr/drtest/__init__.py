"""The monthly DR test: environments, integrity suites, smoke tests, query benchmark, report."""
