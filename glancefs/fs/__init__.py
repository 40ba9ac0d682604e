"""The filesystem: Glance's image catalog as a directory tree, built on the public client API.

Layers, top to bottom (ARCHITECTURE.md draws them; import-linter checks them): :mod:`.daemon`
puts a mount in the background, :mod:`.mount` runs it and :mod:`.operations` answers the kernel
(the only two modules that know pyfuse3); :mod:`.catalog`, :mod:`.reader` and :mod:`.uploader` do
the filesystem's I/O through :class:`glancefs.Client`; the rest is pure logic, without I/O.
"""
