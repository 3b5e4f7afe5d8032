"""placeholder"""
PAGE = "<!doctype html><title>sluiceway</title>"
