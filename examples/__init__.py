"""Runnable examples of the public var-export API (outside the installed package)."""
