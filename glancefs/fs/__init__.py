"""The filesystem: Glance's image catalog as a directory tree, built on the public client API.

Layers, top to bottom (ARCHITECTURE.md draws them; import-linter checks them): :mod:`.daemon`
puts a mount in the background, :mod:`.mount` builds and runs it and :mod:`.operations` answers the
kernel (the only two modules that know pyfuse3); :mod:`.filesystem` (with :mod:`.tree` and
:mod:`.files`) decides what each request does; :mod:`.catalog`, :mod:`.changes`, :mod:`.read` and
:mod:`.uploader` do the filesystem's I/O through the client, typed as what they need of it
(:class:`.glance.Glance`); the rest is pure logic, without I/O.
"""
