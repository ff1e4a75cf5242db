"""Diagnostics: complexity counting (the papers' MAdds/params/memory) and pictures of results."""
