with

source as (

    select * from {{ source('raw', 'interactions') }}

),

renamed as (

    select
        -- deterministic id: raw rows are unique on (user_id, item_id, ts), so this order is total
        {{ dbt.cast('row_number() over (order by ts, user_id, item_id)', dbt.type_bigint()) }} as event_id,
        {{ dbt.cast('user_id', dbt.type_bigint()) }} as user_id,
        {{ dbt.cast('item_id', dbt.type_bigint()) }} as item_id,
        {{ dbt.cast('rating', recsys.type_double()) }} as rating,
        {{ dbt.cast('ts', dbt.type_bigint()) }} as ts,
        source_file,
        source_row

    from source

)

select * from renamed
