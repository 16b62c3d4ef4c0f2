"""Cooking: gather and check the ingredients, evaluate them, run the registered methods, save each
dish and write the report, resumably."""
