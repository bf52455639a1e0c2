"""Document routing on the coordinator: which training document each expert column trains on.

* :mod:`~coordinator.routing.assign` — capacity-balanced assignment, balanced k-means and
  the centroid router (pure numpy);
* :mod:`~coordinator.routing.assignment` — document features, the
  :class:`~coordinator.routing.assignment.ColumnAssignment` shared by the federation loop
  and the unit factory, and the initial (k-means) assignment of a stage;
* :mod:`~coordinator.routing.rescoring` — routing refined by the per-document losses
  participants report in scoring units, persisted through :mod:`coordinator.db.doc_routing`;
* :mod:`~coordinator.routing.scoring_settings` — the scoring settings' check (torch-free);
* :mod:`~coordinator.routing.unit_documents` — a unit's (column, document) pairs: as stored
  with the lease and as sent in ``WorkUnit.documents``.
"""
