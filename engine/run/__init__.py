"""A run: request validation and fit refusals (`request`), the generator (`generate`), latent previews
(`preview`), the MP4 and its sidecar (`video`) and the outputs listing for the gallery (`outputs`)."""
