"""Everything about faces: finding them (detect), following them (track), the faces file,
aligning them to GPEN's template (align) and face-parsing paste masks (parse)."""
