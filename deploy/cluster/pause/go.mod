module streamoasis.local/pause

go 1.22
