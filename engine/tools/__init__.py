"""Tools around the server: ``bench`` (load generator of ``dagserve bench``) and ``scaffold``
(``dagserve new-plugin``)."""
