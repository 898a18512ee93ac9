//go:build tools

// Package toxiproxy pins Shopify's Toxiproxy server for msgbus's failure tests: integration/_toxiproxy.py runs
// `go build github.com/Shopify/toxiproxy/v2/cmd/server` in this module, so go.mod and go.sum fix its version.
package toxiproxy

import _ "github.com/Shopify/toxiproxy/v2/cmd/server"
