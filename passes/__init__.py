"""Built-in passes, one module each, written only against qcompiler's public API.

Passes are found through the registry (``qcompiler passes`` lists them); importing this
package does not import or register any of them.
"""
